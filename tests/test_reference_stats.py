"""The reference importance statistics and keep factors: float64 accuracy over cache-sized chunks
(importance and keep correctly rounded to float32), the spec's zero and non-finite rules exactly,
accumulation in every stored format, and no full-size float64 temporaries."""

from __future__ import annotations

import math

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from spg_fast import reference, storage
from tests.helpers import oracle_importance
from tests.kernels.common import oracle_keep

# The chunk length is patched down for these tests (see the fixture), so that tensors of a few
# thousand elements cross chunk boundaries: one element over, several chunks with a ragged tail,
# exactly two chunks.
CHUNK = 1024
MULTI_CHUNK = [CHUNK + 1, 3 * CHUNK + 99, 2 * CHUNK]
# The statistics are float64 throughout (relative error ~1e-15); only where the exact value lies
# this close to a float32 rounding midpoint (absolutely for the importance, relatively for the keep
# factor) may the result round to the neighbouring float32 value.
TIE_WIDTH = 1e-12


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(reference, "_CPU_CHUNK", CHUNK)


def _assert_correctly_rounded(
    got: torch.Tensor, want: torch.Tensor, relative: bool = False
) -> None:
    """Every element is the float32 rounding of the float64 oracle ``want``, except within
    TIE_WIDTH (times ``|want|`` when ``relative``) of a midpoint, where it is one of the two
    neighbours."""
    assert got.dtype == torch.float32
    want = want.reshape(got.shape)
    nearest = want.float()
    differ = got != nearest
    if bool(differ.any()):
        w = want[differ]
        width = TIE_WIDTH * w.abs() if relative else TIE_WIDTH
        below = torch.nextafter(nearest[differ], torch.tensor(-1.0)).double()
        above = torch.nextafter(nearest[differ], torch.tensor(2.0)).double()
        n = nearest[differ].double()
        gap = torch.minimum((w - (n + below) / 2).abs(), (w - (n + above) / 2).abs())
        assert bool((gap < width).all()), f"{int(differ.sum())} elements off the rounded oracle"
        ulp = torch.maximum(above - n, n - below)
        assert bool(((got[differ].double() - w).abs() <= ulp / 2 + width).all())


def _assert_importance_and_keep(h: torch.Tensor, shift: float = 0.0) -> None:
    """``importance(h)`` and ``keep(h)`` are the float32 roundings of the float64 oracles, and so
    is the keep factor ``accumulate_`` stores over a fresh (keep 1) float32 accumulator.

    The oracles run on ``h - shift`` (exact in float64 for a float32 ``shift`` near the values):
    standardisation does not depend on a shift, and without it the oracle's own mean of values
    like 3e6 +- 0.5 is off by ~1e-9.
    """
    centred = h.double() - shift
    _assert_correctly_rounded(reference.importance(h), oracle_importance(centred))
    # Never rounded to 0: below float32's smallest positive value it is that value (storage).
    want_keep = oracle_keep(centred).clamp(min=storage.SMALLEST[torch.float32])
    keep = reference.keep(h)
    _assert_correctly_rounded(keep, want_keep, relative=True)
    stored = storage.fresh(h.shape, torch.float32, h.device)
    assert not bool(reference.accumulate_([stored], [h]).any())
    assert torch.equal(stored, keep)


def _gradient(n: int, seed: int, mean: float, std: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g, dtype=torch.float64) * std + mean).float()


@pytest.mark.parametrize("n", [2, 7, 1023, *MULTI_CHUNK])
@pytest.mark.parametrize(
    "mean, std", [(0.0, 1.0), (1e-4, 1e-3), (1e4, 1.0), (3e6, 0.5), (-2e3, 1e-2)]
)
def test_float32_result_is_the_rounded_float64_oracle(n, mean, std):
    """mean >> std included: 1e4 / 1 and 3e6 / 0.5 (float32 keeps about 2 and 0 bits below the
    point there)."""
    h = _gradient(n, seed=n % 1000, mean=mean, std=std)
    _assert_importance_and_keep(h, float(torch.tensor(mean, dtype=torch.float32)))


def test_outlier_pivot_costs_no_precision():
    """The first element (the shift) far from the rest, in a later chunk the mean: Chan's merge
    keeps precision."""
    h = _gradient(3 * CHUNK + 17, seed=5, mean=0.0, std=1e-3)
    h[0] = 1e5
    h[2 * CHUNK :] += 7.0
    _assert_importance_and_keep(h)


@pytest.mark.parametrize("z", [3.5, 9.0, 20.0, 45.0, 51.0])
def test_tiny_keep_factors_keep_their_relative_precision(z):
    """One outlier at about ``|z|`` among unit noise (its value solved for that z): keep factors
    ``~2 exp(-2|z|)`` from 2e-3 down to 1e-44 (float32 subnormals from |z| = 43.7 on), the rounded
    oracle each time, never 0 (``1 - tanh`` in float64 is exactly 0 from |z| = 19 on)."""
    n = 4 * CHUNK + 5
    h = _gradient(n, seed=11, mean=0.0, std=1.0)
    h[n // 2] = z / ((1 - 1 / n) ** 2 - z * z / n) ** 0.5
    keep = reference.keep(h)
    _assert_correctly_rounded(keep, oracle_keep(h), relative=True)
    smallest = float(keep[n // 2])
    assert 0 < smallest < 10 * math.exp(-2 * z)
    assert (smallest < 2.0**-126) == (z > 43.7)


@pytest.mark.parametrize("n", [2, 1023, *MULTI_CHUNK])
def test_float64_input_matches_the_oracle(n):
    h = _gradient(n, seed=3, mean=1e4, std=1.0).double() + torch.linspace(
        0, 1e-3, n, dtype=torch.float64
    )
    got = reference.importance(h)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, oracle_importance(h - 1e4), rtol=0, atol=1e-14)
    keep = reference.keep(h)
    assert keep.dtype == torch.float64
    torch.testing.assert_close(keep, oracle_keep(h - 1e4), rtol=1e-13, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_narrow_inputs_are_computed_from_their_exact_values(dtype):
    h = _gradient(CHUNK + 99, seed=4, mean=0.5, std=0.1).to(dtype)
    _assert_importance_and_keep(h)


@pytest.mark.parametrize("value", [0.0, 0.1, -3.7e5, 1e-30, float.fromhex("0x1.fffffep127")])
@pytest.mark.parametrize("n", [1, 2, 17, *MULTI_CHUNK])
def test_constant_tensors_give_exactly_zero(value, n):
    """Including a constant whose float32 mean is inexact (0.1), the largest float32 and
    multi-chunk constants."""
    h = torch.full((n,), value)
    assert torch.equal(reference.importance(h), torch.zeros(n))
    assert torch.equal(reference.keep(h), torch.ones(n))
    stored = [storage.fresh((n,), dtype, h.device) for dtype in (torch.float32, torch.uint8)]
    stored.append(torch.full((n,), 0.25))
    before = [k.clone() for k in stored]
    assert not bool(reference.accumulate_(stored, [h] * 3).any())
    assert all(torch.equal(a, b) for a, b in zip(stored, before, strict=True))


def test_one_constant_chunk_among_varying_ones_is_not_constant():
    h = torch.zeros(2 * CHUNK + 5)
    h[-1] = 1e-30
    _assert_importance_and_keep(h)
    assert float(reference.importance(h)[-1]) > 0.99


def test_float64_overflowing_spread_gives_zero_not_nan():
    """Finite float64 values whose variance overflows: the std is not finite, so the importance
    is 0 (no flag)."""
    h = torch.zeros(1000, dtype=torch.float64)
    h[0], h[1] = 1e308, -1e308
    assert torch.equal(reference.importance(h), torch.zeros_like(h))
    stored = storage.fresh(h.shape, torch.float64, h.device)
    assert reference.accumulate_([stored], [h]).tolist() == [False]
    assert torch.equal(stored, torch.ones_like(h))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), "both infinities"])
@pytest.mark.parametrize("where", [0, 5, 2 * CHUNK + 3])
def test_non_finite_values_are_flagged_in_any_chunk(dtype, bad, where):
    h = _gradient(3 * CHUNK, seed=6, mean=0.0, std=1.0).to(dtype)
    if bad == "both infinities":
        h[where], h[-1] = float("inf"), float("-inf")
    else:
        h[where] = bad
    stored = torch.rand(h.shape, generator=torch.Generator().manual_seed(0))
    before = stored.clone()
    flags = reference.accumulate_(
        [torch.ones(3), stored, torch.ones(3)], [torch.arange(3.0), h, torch.ones(3)]
    )
    assert flags.tolist() == [False, True, False]
    assert torch.equal(stored, before)
    with pytest.raises(FloatingPointError, match=r"conv1\.weight: gradient holds non-finite"):
        reference.importance(h, name="conv1.weight")


def test_non_contiguous_stored_keeps_are_updated_in_place():
    h = _gradient(6 * 5000, seed=7, mean=0.2, std=1.0).reshape(6, 5000)
    base = torch.ones(5000, 6)
    reference.accumulate_([base.t()], [h])
    assert torch.equal(base.t(), reference.keep(h))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.uint8])
def test_narrow_formats_store_the_float32_keep_encoded(dtype):
    """Accumulated twice, into a fresh and a random stored tensor: the encoding of the float32
    keep factor, and the minimum in the stored domain."""
    h = _gradient(CHUNK + 7, seed=8, mean=0.0, std=1.0)
    h[:3] = torch.tensor([9.0, -40.0, 60.0]) * float(h.numel()) ** 0.5  # tiny keeps stay above 0
    fresh = storage.fresh(h.shape, dtype, h.device)
    old = storage.encode(torch.rand(h.shape, generator=torch.Generator().manual_seed(1)), dtype)
    stored = [fresh, old.clone()]
    reference.accumulate_(stored, [h, h])
    new = storage.encode(reference.keep(h), dtype)
    assert torch.equal(stored[0], new) and torch.equal(stored[1], torch.minimum(old, new))
    assert bool((storage.decode(stored[0]) > 0).all())


def test_no_full_size_float64_temporaries(monkeypatch):
    """accumulate_ on 2**19 float32 elements allocates nothing larger than one float64 chunk of the
    real size (a whole float64 copy would be 4 MiB, a float32 one 2 MiB)."""
    monkeypatch.undo()
    h = _gradient(1 << 19, seed=9, mean=1.0, std=1.0)
    stored = storage.fresh(h.shape, torch.float32, h.device)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        reference.accumulate_([stored], [h])
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert 0 < largest <= 8 * reference._CPU_CHUNK < 4 * h.numel()


def _pieces(h: torch.Tensor, k: int) -> list[torch.Tensor]:
    """``h`` cut into ``k`` uneven pieces (as FSDP2 shards rows), with an empty piece second."""
    parts = list(torch.tensor_split(h, k))
    return [parts[0], h[:0], *parts[1:]]


def _merged_keep(h: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The keep factors ``accumulate_with_`` stores over fresh float32 pieces, joined."""
    parts = _pieces(h, k)
    stats = reference.merge_moments(torch.stack([reference.moments(p) for p in parts]))
    stored = [torch.ones_like(p) for p in parts]
    flags = reference.accumulate_with_(stored, parts, stats.expand(len(parts), -1))
    return torch.cat(stored), flags


@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("n", [2, 7, *MULTI_CHUNK])
@pytest.mark.parametrize("mean, std", [(0.0, 1.0), (1e4, 1.0), (3e6, 0.5), (-2e3, 1e-2)])
def test_pieces_with_merged_statistics_get_the_whole_tensors_importance(n, mean, std, k):
    """Shards standardised with their merged moments: the whole tensor's keep factor, exactly as
    ``keep`` forms it (the rounded float64 oracle)."""
    h = _gradient(n, seed=n % 1000 + k, mean=mean, std=std)
    got, flags = _merged_keep(h, k)
    assert not bool(flags.any())
    shift = float(torch.tensor(mean, dtype=torch.float32))
    _assert_correctly_rounded(got, oracle_keep(h.double() - shift), relative=True)
    assert torch.equal(got, reference.keep(h))


@pytest.mark.parametrize("value", [0.0, 0.1, -3e6])
def test_constant_pieces_merge_to_exactly_zero(value):
    h = torch.full((2 * CHUNK + 5,), value)
    stats = reference.merge_moments(torch.stack([reference.moments(p) for p in _pieces(h, 3)]))
    assert float(stats[3]) == 0.0
    got, flags = _merged_keep(h, 3)
    assert not bool(flags.any()) and bool((got == 1).all())


def test_one_element_among_empty_pieces_gives_zero():
    h = torch.tensor([2.5])
    got, flags = _merged_keep(h, 1)
    assert got.tolist() == [1.0] and not bool(flags.any())
    stats = reference.merge_moments(torch.stack([reference.moments(h[:0]), reference.moments(h)]))
    assert stats.tolist() == [1.0, 2.5, 0.0, 0.0, 1.0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_piece_flags_every_piece_and_changes_nothing(bad):
    h = _gradient(3 * CHUNK, seed=3, mean=0.0, std=1.0)
    h[2 * CHUNK + 1] = bad
    parts = _pieces(h, 3)
    stats = reference.merge_moments(torch.stack([reference.moments(p) for p in parts]))
    stored = [torch.full_like(p, 0.25) for p in parts]
    flags = reference.accumulate_with_(stored, parts, stats.expand(len(parts), -1))
    assert bool(flags.all())
    assert all(bool((a == 0.25).all()) for a in stored)


def test_head_scale_of_shards_is_that_of_the_whole():
    """Two holders' shards of stored keep factors, their float64 totals summed by ``reduce`` (as
    an all-reduce would)."""
    g = torch.Generator().manual_seed(4)
    whole = [torch.rand(33, 5, generator=g), torch.rand(1, 6, generator=g)]
    mine = [whole[0][:17], whole[1][:1]]
    theirs = [whole[0][17:], whole[1][1:]]
    other_total = torch.stack([reference.float64_sum(t) for t in theirs]).sum()
    calls = []

    def reduce(total: torch.Tensor) -> None:
        calls.append(1)
        total += other_total

    got = reference.head_scale(mine, numel=sum(t.numel() for t in whole), reduce=reduce)
    assert calls == [1]
    assert float(got) == float(reference.head_scale(whole))
