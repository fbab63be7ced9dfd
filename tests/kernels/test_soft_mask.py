"""The mask kernels, ``soft_mask_`` (gradients) and ``scale_updates_`` (the change a step made),
reading stored keep factors in every format: Triton's bit-identical to the reference and within one
rounding of a float64 oracle, on fresh random inputs in awkward layouts; the native CPU ones (the
torch backend's on contiguous float32/float64 CPU tensors) bit-identical to the reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spg_fast import reference, storage
from spg_fast.kernels.cpu import soft_mask as native
from spg_fast.kernels.triton.soft_mask import scale_updates_, soft_mask_
from tests.kernels.common import (
    DEVICE,
    GRAD_DTYPES,
    KEEP_DTYPES,
    LAYOUTS,
    SHAPES,
    keep64,
    layout_cases,
    random_keeps,
    random_tensor,
)


def _inputs(dtype, keep_dtype, layout, seed):
    """Shared tensors with their stored keep factors (in the same layout), heads and a head
    scale."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [s for s in SHAPES if layout == "contiguous" or len(s) == 2]
    xs = [random_tensor(s, dtype, gen, layout) for s in shapes]
    keeps = [random_keeps(s, keep_dtype, gen, layout) for s in shapes]
    heads = [random_tensor(s, dtype, gen, layout) for s in shapes[:3]]
    scale = reference.head_scale([k for k in keeps if k.numel()])
    return gen, xs, keeps, heads, scale


def _factors64(xs, keeps, heads, scale):
    return [keep64(k) for k in keeps] + [scale.double().expand(h.shape) for h in heads]


@pytest.mark.parametrize("dtype, keep_dtype, layout", layout_cases())
def test_soft_mask_matches_reference_bit_for_bit(dtype, keep_dtype, layout):
    seed = GRAD_DTYPES.index(dtype) * 10 + LAYOUTS.index(layout)
    _, grads, keeps, heads, scale = _inputs(dtype, keep_dtype, layout, seed)
    want, want_heads = [g.clone() for g in grads], [h.clone() for h in heads]
    factors = _factors64(grads, keeps, heads, scale)
    oracle = [x.double() * f for x, f in zip(grads + heads, factors, strict=True)]
    reference.soft_mask_(want, keeps, want_heads, scale)
    soft_mask_(grads, keeps, heads, scale)
    eps = torch.finfo(dtype).eps
    for got, exp, orc in zip(grads + heads, want + want_heads, oracle, strict=True):
        assert got.dtype == dtype
        assert torch.equal(got, exp)
        # one rounding to the gradient's dtype, which may also underflow to 0 (tiny keeps)
        tiny = torch.finfo(dtype).smallest_normal
        torch.testing.assert_close(got.double(), orc, rtol=eps, atol=tiny)


@pytest.mark.parametrize(
    "dtype, keep_dtype, layout", layout_cases(["contiguous", "transposed", "strided"])
)
def test_scale_updates_matches_reference_bit_for_bit(dtype, keep_dtype, layout):
    """``p <- before + keep * (p - before)``; ``before`` only read by the kernel, in another layout
    than ``p`` for the strided case."""
    seed = 100 + GRAD_DTYPES.index(dtype) * 10 + LAYOUTS.index(layout)
    gen, params, keeps, heads, scale = _inputs(dtype, keep_dtype, layout, seed)
    # the values before the step: a small change, and sign changes (values near 0) among them
    before = [
        (
            p.double()
            - torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.device) * 0.05
        ).to(dtype)
        for p in params
    ]
    head_before = [(h.double() * 1.01).to(dtype) for h in heads]
    if layout == "strided":
        before = [b.contiguous() for b in before]
    factors = _factors64(params, keeps, heads, scale)
    oracle = [
        b.double() + f * (p.double() - b.double())
        for p, b, f in zip(params + heads, before + head_before, factors, strict=True)
    ]
    want, want_heads = [p.clone() for p in params], [h.clone() for h in heads]
    kept = [b.clone() for b in before + head_before]
    reference.scale_updates_(
        want,
        [b.clone() for b in before],
        keeps,
        want_heads,
        [b.clone() for b in head_before],
        scale,
    )
    scale_updates_(params, before, keeps, heads, head_before, scale)
    assert all(torch.equal(a, b) for a, b in zip(before + head_before, kept, strict=True))
    for got, exp, orc, b in zip(params + heads, want + want_heads, oracle, kept, strict=True):
        assert got.dtype == dtype
        assert torch.equal(got, exp)
        # float32 forms the difference, the product and the sum (three roundings at the scale of
        # the operands), then one rounding to the parameter's dtype
        scale_of = torch.maximum(b.double().abs(), orc.abs())
        bound = torch.finfo(dtype).eps / 2 * orc.abs() + 2.0**-23 * scale_of
        assert bool(((got.double() - orc).abs() <= bound).all())


@pytest.mark.parametrize("keep_dtype", KEEP_DTYPES, ids=lambda d: str(d)[6:])
def test_keep_factors_of_one_and_zero(keep_dtype):
    """Keep 0 zeroes a gradient and undoes a step exactly; keep 1 leaves a gradient as it is."""
    zero = storage.encode(torch.zeros(1030, device=DEVICE), keep_dtype)
    one = storage.fresh((1030,), keep_dtype, DEVICE)
    grads = [torch.randn(1030, device=DEVICE) for _ in range(2)]
    before = [g.clone() for g in grads]
    soft_mask_(grads, [zero, one], [], torch.ones((), device=DEVICE))
    assert bool((grads[0] == 0).all()) and torch.equal(grads[1], before[1])
    params, start = [torch.randn(1030, device=DEVICE)], torch.randn(1030, device=DEVICE)
    scale_updates_(params, [start], [zero], [], [], torch.ones((), device=DEVICE))
    assert torch.equal(params[0], start)


# What SPG stores for float32 and float64 parameters (``storage.stored_dtype``).
NATIVE_CASES = [(torch.float32, keep) for keep in KEEP_DTYPES] + [
    (torch.float64, keep) for keep in (torch.float64, *KEEP_DTYPES)
]


@pytest.mark.parametrize(
    "dtype, keep_dtype",
    NATIVE_CASES,
    ids=[f"{str(d)[6:]}-keep_{str(k)[6:]}" for d, k in NATIVE_CASES],
)
def test_native_cpu_kernels_match_reference_bit_for_bit(dtype, keep_dtype):
    gen = torch.Generator().manual_seed(7)
    cpu = torch.device("cpu")
    shapes = [(7, 3), (0,), (1,), (40001,), (1023,)]
    xs = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    keeps = [random_keeps(s, keep_dtype, gen, device=cpu) for s in shapes]
    heads = [torch.randn(9, generator=gen, dtype=torch.float64).to(dtype)]
    scale = reference.head_scale([k for k in keeps if k.numel()]).float()
    before = [x + torch.randn(x.shape, generator=gen, dtype=dtype) * 0.1 for x in xs + heads]
    for op in ("soft_mask_", "scale_updates_"):
        ours, theirs = [[x.clone() for x in xs + heads] for _ in range(2)]
        n = len(xs)
        if op == "soft_mask_":
            native.soft_mask_(ours[:n], keeps, ours[n:], scale)
            reference.soft_mask_(theirs[:n], keeps, theirs[n:], scale)
        else:
            kept = [b.clone() for b in before]
            native.scale_updates_(ours[:n], before[:n], keeps, ours[n:], before[n:], scale)
            assert all(torch.equal(a, b) for a, b in zip(before, kept, strict=True))
            kept = [b.clone() for b in before]
            reference.scale_updates_(theirs[:n], kept[:n], keeps, theirs[n:], kept[n:], scale)
        for a, b in zip(ours, theirs, strict=True):
            assert a.dtype == dtype and torch.equal(a, b), op


def test_mixed_dtypes_in_one_call():
    """Several (gradient dtype, keep format) groups and heads of dtypes no shared tensor has."""
    gen = torch.Generator().manual_seed(5)
    grads = [random_tensor((1030,), dt, gen) for dt in GRAD_DTYPES] * 2
    grads = [g.clone() for g in grads]
    keeps = [random_keeps((1030,), kd, gen) for kd in KEEP_DTYPES * 2]
    heads = [random_tensor((9,), torch.bfloat16, gen), random_tensor((4,), torch.float16, gen)]
    scale = torch.tensor(0.75, device=DEVICE)
    want, want_heads = [g.clone() for g in grads], [h.clone() for h in heads]
    reference.soft_mask_(want, keeps, want_heads, scale)
    soft_mask_(grads, keeps, heads, scale)
    assert all(torch.equal(a, b) for a, b in zip(grads + heads, want + want_heads, strict=True))


def test_bad_arguments_are_named():
    z = torch.zeros(3, device=DEVICE)
    s = torch.tensor(1.0, device=DEVICE)
    with pytest.raises(ValueError, match="pair up"):
        soft_mask_([z], [], [], s)
    with pytest.raises(ValueError, match=r"tensor 0 has shapes \(3,\) and \(4,\)"):
        soft_mask_([z], [torch.zeros(4, device=DEVICE)], [], s)
    with pytest.raises(TypeError, match=r"tensor 0 has dtype torch\.float64"):
        soft_mask_([], [], [z.double()], s)
    with pytest.raises(TypeError, match=r"keep factor 0 has dtype torch\.float16"):
        soft_mask_([z], [z.half()], [], s)
    with pytest.raises(ValueError, match="one-element float32"):
        soft_mask_([], [], [z], s.double())
    with pytest.raises(ValueError, match=r"values before the step"):
        scale_updates_([z], [], [z], [], [], s)


@settings(max_examples=20, deadline=None)
@given(
    shape=st.lists(st.integers(0, 40), min_size=1, max_size=3).map(tuple),
    dtype=st.sampled_from(GRAD_DTYPES),
    keep_dtype=st.sampled_from(KEEP_DTYPES),
    update=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_matches_reference(shape, dtype, keep_dtype, update, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    k = random_keeps(shape, keep_dtype, gen)
    h = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    scale = torch.rand((), generator=gen).to(DEVICE)
    want, want_h = x.clone(), h.clone()
    if update:
        b, hb = torch.randn_like(x), torch.randn_like(h)
        reference.scale_updates_([want], [b.clone()], [k], [want_h], [hb.clone()], scale)
        scale_updates_([x], [b], [k], [h], [hb], scale)
    else:
        reference.soft_mask_([want], [k], [want_h], scale)
        soft_mask_([x], [k], [h], scale)
    assert torch.equal(x, want) and torch.equal(h, want_h)
