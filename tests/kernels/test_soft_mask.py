"""The Triton soft mask against the reference (bit-identical) and a float64 oracle, on fresh
random inputs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spg_fast import reference
from spg_fast.kernels.triton.soft_mask import soft_mask_
from tests.kernels.common import DEVICE, GRAD_DTYPES, LAYOUTS, SHAPES, random_tensor


def _importances(shapes, dtype, gen):
    out = [torch.rand(s, generator=gen).to(dtype).to(DEVICE) for s in shapes]
    if out and out[0].numel():
        out[0].view(-1)[0] = (
            1.0  # A can be exactly 1 in float32 (tanh saturates): the gradient is zeroed
        )
    return out


@pytest.mark.parametrize("imp_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", GRAD_DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_reference_bit_for_bit(dtype, imp_dtype, layout):
    gen = torch.Generator().manual_seed(GRAD_DTYPES.index(dtype) * 10 + LAYOUTS.index(layout))
    shapes = [s for s in SHAPES if layout == "contiguous" or len(s) == 2]
    grads = [random_tensor(s, dtype, gen, layout) for s in shapes]
    heads = [random_tensor(s, dtype, gen, layout) for s in shapes[:3]]
    imps = _importances(shapes, imp_dtype, gen)
    scale = reference.head_scale([i for i in imps if i.numel()])
    want = [g.clone() for g in grads]
    want_heads = [h.clone() for h in heads]
    oracle = [g.double() * (1 - a.double()) for g, a in zip(grads, imps, strict=True)]
    oracle += [h.double() * scale.double() for h in heads]
    reference.soft_mask_(want, reference.keep_factors(imps), want_heads, scale)
    soft_mask_(grads, imps, heads, scale)
    eps = torch.finfo(dtype).eps
    for got, exp, orc in zip(grads + heads, want + want_heads, oracle, strict=True):
        assert got.dtype == dtype
        assert torch.equal(got, exp)
        torch.testing.assert_close(got.double(), orc, rtol=eps, atol=0)


def test_mixed_gradient_dtypes_in_one_call():
    gen = torch.Generator().manual_seed(5)
    grads = [random_tensor((1030,), dt, gen) for dt in GRAD_DTYPES]
    heads = [
        random_tensor((9,), torch.bfloat16, gen),
        random_tensor((4,), torch.float64, gen).float(),
    ]
    imps = _importances([(1030,)] * 3, torch.float32, gen)
    scale = torch.tensor(0.75, device=DEVICE)
    want, want_heads = [g.clone() for g in grads], [h.clone() for h in heads]
    reference.soft_mask_(want, reference.keep_factors(imps), want_heads, scale)
    soft_mask_(grads, imps, heads, scale)
    assert all(torch.equal(a, b) for a, b in zip(grads + heads, want + want_heads, strict=True))


def test_bad_arguments_are_named():
    z = torch.zeros(3, device=DEVICE)
    s = torch.tensor(1.0, device=DEVICE)
    with pytest.raises(ValueError, match="pair up"):
        soft_mask_([z], [], [], s)
    with pytest.raises(ValueError, match=r"tensor 0 has shapes \(3,\) and \(4,\)"):
        soft_mask_([z], [torch.zeros(4, device=DEVICE)], [], s)
    with pytest.raises(TypeError, match=r"gradient 0 has dtype torch\.float64"):
        soft_mask_([], [], [z.double()], s)
    with pytest.raises(ValueError, match="one-element float32"):
        soft_mask_([], [], [z], s.double())


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(0, 40), min_size=1, max_size=3).map(tuple),
    dtype=st.sampled_from(GRAD_DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_matches_reference(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    a = torch.rand(shape, generator=gen).to(DEVICE)
    h = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    scale = torch.rand((), generator=gen).to(DEVICE)
    want, want_h = g.clone(), h.clone()
    reference.soft_mask_([want], reference.keep_factors([a]), [want_h], scale)
    soft_mask_([g], [a], [h], scale)
    assert torch.equal(g, want) and torch.equal(h, want_h)
