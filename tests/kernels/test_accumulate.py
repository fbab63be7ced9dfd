"""The Triton importance update against the reference and the float64 oracle, on fresh
random inputs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spg_fast import reference
from spg_fast.kernels.triton.importance_max import importance_max_
from tests.helpers import oracle_importance
from tests.kernels.common import DEVICE, GRAD_DTYPES, LAYOUTS, SHAPES, random_tensor

# Both compute in float64 and round once, so they agree to within one float32 rounding of a tie, and
# each is within half an ulp (2**-25 below 1) of the float64 oracle, plus float64 noise.
ORACLE_ATOL = 2.0**-25 + 1e-9


def _run(grads, acc_dtype, gen):
    accs = [torch.rand(h.shape, generator=gen).to(acc_dtype).to(DEVICE) for h in grads]
    ref = [a.clone() for a in accs]
    before = [a.clone() for a in accs]
    flags = importance_max_(accs, grads)
    ref_flags = reference.importance_max_(ref, grads)
    assert flags.device.type == DEVICE.type
    assert flags.cpu().tolist() == ref_flags.cpu().tolist()
    return accs, ref, before, flags


@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", GRAD_DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_reference_and_oracle(dtype, acc_dtype, layout):
    gen = torch.Generator().manual_seed(GRAD_DTYPES.index(dtype) * 10 + LAYOUTS.index(layout))
    shapes = [s for s in SHAPES if layout == "contiguous" or len(s) == 2]
    grads = [random_tensor(s, dtype, gen, layout) for s in shapes]
    accs, ref, before, _ = _run(grads, acc_dtype, gen)
    for a, r, b, h in zip(accs, ref, before, grads, strict=True):
        assert a.dtype == acc_dtype
        torch.testing.assert_close(
            a, r, rtol=0, atol=2.0**-24 if acc_dtype == torch.float32 else 2.0**-8
        )
        if acc_dtype == torch.float32:
            want = torch.maximum(b.double().cpu(), oracle_importance(h.cpu()))
            torch.testing.assert_close(a.double().cpu(), want, rtol=0, atol=ORACLE_ATOL)


@pytest.mark.parametrize(
    "case", ["zeros", "constant", "one", "huge_offset", "constant_per_tile", "one_differs"]
)
def test_spec_edge_cases(case):
    """The constant rule holds exactly (importance 0 only for a constant tensor): also for a tensor
    that is constant within each 1024-element tile but not across tiles, and one where a single
    element differs."""
    gen = torch.Generator().manual_seed(1)
    h = {
        "zeros": torch.zeros(1500),
        "constant": torch.full((1500,), 0.1),
        "one": torch.tensor([3.0]),
        "huge_offset": torch.randn(3000, generator=gen, dtype=torch.float64).add(1e4).float(),
        "constant_per_tile": torch.cat([torch.full((1024,), 0.1), torch.full((1500,), 0.2)]),
        "one_differs": torch.full((2500,), 0.1).index_fill_(0, torch.tensor([2047]), 0.1 + 2**-26),
    }[case].to(DEVICE)
    acc = torch.zeros_like(h)
    importance_max_([acc], [h])
    torch.testing.assert_close(
        acc.double().cpu(), oracle_importance(h.cpu()), rtol=0, atol=ORACLE_ATOL
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize(
    "where", [0, 1037]
)  # the first element is also the pivot the statistics are shifted by
def test_non_finite_gradients_are_flagged_and_left_alone(bad, where):
    gen = torch.Generator().manual_seed(2)
    grads = [random_tensor((1100,), torch.float32, gen) for _ in range(3)]
    grads[1][where] = bad
    accs, ref, before, flags = _run(grads, torch.float32, gen)
    assert flags.cpu().tolist() == [False, True, False]
    assert torch.equal(accs[1], before[1])
    assert torch.equal(accs[0], ref[0]) and torch.equal(accs[2], ref[2])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="pair up"):
        importance_max_([torch.zeros(3, device=DEVICE)], [])
    with pytest.raises(TypeError, match=r"gradient 0 has dtype torch\.float64"):
        importance_max_(
            [torch.zeros(3, device=DEVICE)], [torch.zeros(3, dtype=torch.float64, device=DEVICE)]
        )
    with pytest.raises(TypeError, match=r"accumulator 0 has dtype torch\.float16"):
        importance_max_(
            [torch.zeros(3, dtype=torch.float16, device=DEVICE)], [torch.zeros(3, device=DEVICE)]
        )
    assert importance_max_([], []).shape == (0,)


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(0, 40), min_size=1, max_size=3).map(tuple),
    dtype=st.sampled_from(GRAD_DTYPES),
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(1e-3, 1e3),
    offset=st.floats(-1e4, 1e4),
)
def test_property_matches_reference(shape, dtype, seed, scale, offset):
    gen = torch.Generator().manual_seed(seed)
    h = (
        (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset)
        .to(dtype)
        .to(DEVICE)
    )
    acc = torch.rand(shape, generator=gen).to(DEVICE)
    ref = acc.clone()
    importance_max_([acc], [h])
    reference.importance_max_([ref], [h])
    torch.testing.assert_close(acc, ref, rtol=0, atol=2.0**-24)
