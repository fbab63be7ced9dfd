"""The Triton importance accumulation, ``stored <- min(stored, encode(keep(h)))`` in every stored
keep format, against the reference and a float64 oracle, on fresh random inputs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spg_fast import reference, storage
from spg_fast.kernels.triton.accumulate import accumulate_
from tests.kernels.common import (
    DEVICE,
    GRAD_DTYPES,
    KEEP_DTYPES,
    LAYOUTS,
    SHAPES,
    code_distance,
    layout_cases,
    oracle_keep,
    random_keeps,
    random_tensor,
)

# Both form the statistics in float64 (in different orders) and round the keep factor once to
# float32, so they give the same bits except where the exact keep lies within float64 noise
# (~1e-15 relative) of a float32 rounding midpoint or of a code boundary of the stored format:
# there the two, and the rounded float64 oracle, may be one step apart. On the seeded inputs here
# all three agree exactly (measured), so Triton and reference must give the same bits there; random
# inputs (the property test) and the oracle may differ by that one step.
STEPS = 1


def _run(grads, keep_dtype, gen, layout="contiguous"):
    stored = [random_keeps(tuple(h.shape), keep_dtype, gen, layout) for h in grads]
    ref = [k.clone() for k in stored]
    before = [k.clone() for k in stored]
    flags = accumulate_(stored, grads)
    ref_flags = reference.accumulate_(ref, grads)
    assert flags.device.type == DEVICE.type
    assert flags.cpu().tolist() == ref_flags.cpu().tolist()
    return stored, ref, before, flags


def _expected(before: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``min(before, encode(oracle keep))`` in the stored domain (each encoding is monotone)."""
    new = storage.encode(oracle_keep(h).float(), before.dtype)
    return torch.minimum(before.cpu(), new)


@pytest.mark.parametrize("dtype, keep_dtype, layout", layout_cases())
def test_matches_reference_and_oracle(dtype, keep_dtype, layout):
    gen = torch.Generator().manual_seed(GRAD_DTYPES.index(dtype) * 10 + LAYOUTS.index(layout))
    shapes = [s for s in SHAPES if layout == "contiguous" or len(s) == 2]
    grads = [random_tensor(s, dtype, gen, layout) for s in shapes]
    stored, ref, before, _ = _run(grads, keep_dtype, gen, layout)
    for a, r, b, h in zip(stored, ref, before, grads, strict=True):
        assert a.dtype == keep_dtype
        assert torch.equal(a, r)
        assert code_distance(a, _expected(b, h)) <= STEPS
        assert bool((a.cpu() <= b.cpu()).all()), "a keep factor never grows"


@pytest.mark.parametrize("keep_dtype", KEEP_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize(
    "case", ["zeros", "constant", "one", "huge_offset", "constant_per_tile", "one_differs"]
)
def test_spec_edge_cases(case, keep_dtype):
    """The constant rule holds exactly (importance 0, keep 1, only for a constant tensor): also for
    a tensor that is constant within each 1024-element tile but not across tiles, and one where a
    single element differs."""
    gen = torch.Generator().manual_seed(1)
    h = {
        "zeros": torch.zeros(1500),
        "constant": torch.full((1500,), 0.1),
        "one": torch.tensor([3.0]),
        "huge_offset": torch.randn(3000, generator=gen, dtype=torch.float64).add(1e4).float(),
        "constant_per_tile": torch.cat([torch.full((1024,), 0.1), torch.full((1500,), 0.2)]),
        "one_differs": torch.full((2500,), 0.1).index_fill_(0, torch.tensor([2047]), 0.1 + 2**-26),
    }[case].to(DEVICE)
    stored = storage.fresh(h.shape, keep_dtype, DEVICE)
    fresh = stored.clone()
    accumulate_([stored], [h])
    if case in ("zeros", "constant", "one"):
        assert torch.equal(stored, fresh)
    assert code_distance(stored, _expected(fresh, h)) <= STEPS
    if case == "one_differs":  # |z| = 50: a keep of 7e-44, a subnormal float32 kept above 0
        assert float(storage.decode(stored)[2047]) > 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize(
    "where", [0, 1037]
)  # the first element is also the pivot the statistics are shifted by
def test_non_finite_gradients_are_flagged_and_left_alone(bad, where):
    gen = torch.Generator().manual_seed(2)
    grads = [random_tensor((1100,), torch.float32, gen) for _ in range(3)]
    grads[1][where] = bad
    stored, ref, before, flags = _run(grads, KEEP_DTYPES[where % 3], gen)
    assert flags.cpu().tolist() == [False, True, False]
    assert torch.equal(stored[1], before[1])
    assert torch.equal(stored[0], ref[0]) and torch.equal(stored[2], ref[2])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="pair up"):
        accumulate_([torch.zeros(3, device=DEVICE)], [])
    with pytest.raises(TypeError, match=r"gradient 0 has dtype torch\.float64"):
        accumulate_(
            [torch.zeros(3, device=DEVICE)], [torch.zeros(3, dtype=torch.float64, device=DEVICE)]
        )
    with pytest.raises(TypeError, match=r"stored keep factor 0 has dtype torch\.float16"):
        accumulate_(
            [torch.zeros(3, dtype=torch.float16, device=DEVICE)], [torch.zeros(3, device=DEVICE)]
        )
    assert accumulate_([], []).shape == (0,)


@settings(max_examples=20, deadline=None)
@given(
    shape=st.lists(st.integers(0, 40), min_size=1, max_size=3).map(tuple),
    dtype=st.sampled_from(GRAD_DTYPES),
    keep_dtype=st.sampled_from(KEEP_DTYPES),
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(1e-3, 1e3),
    offset=st.floats(-1e4, 1e4),
)
def test_property_matches_reference(shape, dtype, keep_dtype, seed, scale, offset):
    gen = torch.Generator().manual_seed(seed)
    h = (
        (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset)
        .to(dtype)
        .to(DEVICE)
    )
    stored = random_keeps(shape, keep_dtype, gen)
    ref = stored.clone()
    accumulate_([stored], [h])
    reference.accumulate_([ref], [h])
    assert code_distance(stored, ref) <= STEPS
