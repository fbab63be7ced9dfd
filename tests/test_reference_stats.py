"""The reference importance statistics: float64 accuracy over cache-sized chunks, the spec's zero
and non-finite rules exactly, and no full-size float64 temporaries."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from spg_fast import reference
from tests.helpers import oracle_importance

# The chunk length is patched down for these tests (see the fixture), so that tensors of a few
# thousand elements cross chunk boundaries: one element over, several chunks with a ragged tail,
# exactly two chunks.
CHUNK = 1024
MULTI_CHUNK = [CHUNK + 1, 3 * CHUNK + 99, 2 * CHUNK]
# The statistics are float64 throughout (relative error ~1e-15); only where the exact value lies
# this close to a float32 rounding midpoint may the result round to the neighbouring float32 value.
TIE_WIDTH = 1e-12


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(reference, "_CPU_CHUNK", CHUNK)


def _assert_correctly_rounded(got: torch.Tensor, h: torch.Tensor, shift: float = 0.0) -> None:
    """Every element is the float32 rounding of the float64 oracle, except within TIE_WIDTH of
    a midpoint.

    The oracle runs on ``h - shift`` (exact in float64 for a float32 ``shift`` near the values):
    standardisation does not depend on a shift, and without it the oracle's own mean of values
    like 3e6 +- 0.5 is off by ~1e-9.
    """
    want = oracle_importance(h.double() - shift)
    assert got.dtype == torch.float32
    nearest = want.float()
    differ = got != nearest
    if bool(differ.any()):
        w = want[differ]
        below = torch.nextafter(nearest[differ], torch.tensor(-1.0)).double()
        above = torch.nextafter(nearest[differ], torch.tensor(2.0)).double()
        n = nearest[differ].double()
        gap = torch.minimum((w - (n + below) / 2).abs(), (w - (n + above) / 2).abs())
        assert bool((gap < TIE_WIDTH).all()), f"{int(differ.sum())} elements off the rounded oracle"
        assert bool(((got[differ].double() - w).abs() <= 2.0**-25 + TIE_WIDTH).all())


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
    shift = float(torch.tensor(mean, dtype=torch.float32))
    _assert_correctly_rounded(reference.importance(h), h, shift)
    acc = torch.zeros_like(h)
    flags = reference.importance_max_([acc], [h])
    assert not bool(flags.any())
    _assert_correctly_rounded(acc, h, shift)


def test_outlier_pivot_costs_no_precision():
    """The first element (the shift) far from the rest, in a later chunk the mean: Chan's merge
    keeps precision."""
    h = _gradient(3 * CHUNK + 17, seed=5, mean=0.0, std=1e-3)
    h[0] = 1e5
    h[2 * CHUNK :] += 7.0
    _assert_correctly_rounded(reference.importance(h), h)


@pytest.mark.parametrize("n", [2, 1023, *MULTI_CHUNK])
def test_float64_input_matches_the_oracle(n):
    h = _gradient(n, seed=3, mean=1e4, std=1.0).double() + torch.linspace(
        0, 1e-3, n, dtype=torch.float64
    )
    got = reference.importance(h)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, oracle_importance(h - 1e4), rtol=0, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_narrow_inputs_are_computed_from_their_exact_values(dtype):
    h = _gradient(CHUNK + 99, seed=4, mean=0.5, std=0.1).to(dtype)
    _assert_correctly_rounded(reference.importance(h), h)


@pytest.mark.parametrize("value", [0.0, 0.1, -3.7e5, 1e-30, float.fromhex("0x1.fffffep127")])
@pytest.mark.parametrize("n", [1, 2, 17, *MULTI_CHUNK])
def test_constant_tensors_give_exactly_zero(value, n):
    """Including a constant whose float32 mean is inexact (0.1), the largest float32 and
    multi-chunk constants."""
    h = torch.full((n,), value)
    assert torch.equal(reference.importance(h), torch.zeros(n))
    acc = torch.full((n,), 0.25)
    assert not bool(reference.importance_max_([acc], [h]).any())
    assert torch.equal(acc, torch.full((n,), 0.25))


def test_one_constant_chunk_among_varying_ones_is_not_constant():
    h = torch.zeros(2 * CHUNK + 5)
    h[-1] = 1e-30
    _assert_correctly_rounded(reference.importance(h), h)
    assert float(reference.importance(h)[-1]) > 0.99


def test_float64_overflowing_spread_gives_zero_not_nan():
    """Finite float64 values whose variance overflows: the std is not finite, so the importance
    is 0 (no flag)."""
    h = torch.zeros(1000, dtype=torch.float64)
    h[0], h[1] = 1e308, -1e308
    assert torch.equal(reference.importance(h), torch.zeros_like(h))
    acc = torch.zeros_like(h)
    assert reference.importance_max_([acc], [h]).tolist() == [False]
    assert torch.equal(acc, torch.zeros_like(h))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), "both infinities"])
@pytest.mark.parametrize("where", [0, 5, 2 * CHUNK + 3])
def test_non_finite_values_are_flagged_in_any_chunk(dtype, bad, where):
    h = _gradient(3 * CHUNK, seed=6, mean=0.0, std=1.0).to(dtype)
    if bad == "both infinities":
        h[where], h[-1] = float("inf"), float("-inf")
    else:
        h[where] = bad
    acc = torch.rand(h.shape, generator=torch.Generator().manual_seed(0))
    before = acc.clone()
    flags = reference.importance_max_(
        [torch.zeros(3), acc, torch.zeros(3)], [torch.arange(3.0), h, torch.ones(3)]
    )
    assert flags.tolist() == [False, True, False]
    assert torch.equal(acc, before)
    with pytest.raises(FloatingPointError, match=r"conv1\.weight: gradient holds non-finite"):
        reference.importance(h, name="conv1.weight")


def test_non_contiguous_accumulator_is_updated_in_place():
    h = _gradient(6 * 5000, seed=7, mean=0.2, std=1.0).reshape(6, 5000)
    base = torch.zeros(5000, 6)
    acc = base.t()
    reference.importance_max_([acc], [h])
    _assert_correctly_rounded(base.t().contiguous().reshape(-1), h.reshape(-1))


def test_bfloat16_accumulator_gets_the_float32_importance_rounded():
    h = _gradient(CHUNK + 7, seed=8, mean=0.0, std=1.0)
    a32 = torch.zeros_like(h)
    a16 = torch.zeros_like(h, dtype=torch.bfloat16)
    reference.importance_max_([a32, a16], [h, h])
    assert torch.equal(a16, a32.to(torch.bfloat16))


def test_no_full_size_float64_temporaries(monkeypatch):
    """importance_max_ on 2**19 float32 elements allocates nothing larger than one float64 chunk of
    the real size (a whole float64 copy would be 4 MiB, a float32 one 2 MiB)."""
    monkeypatch.undo()
    h = _gradient(1 << 19, seed=9, mean=1.0, std=1.0)
    acc = torch.zeros_like(h)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        reference.importance_max_([acc], [h])
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert 0 < largest <= 8 * reference._CPU_CHUNK < 4 * h.numel()


def _pieces(h: torch.Tensor, k: int) -> list[torch.Tensor]:
    """``h`` cut into ``k`` uneven pieces (as FSDP2 shards rows), with an empty piece second."""
    parts = list(torch.tensor_split(h, k))
    return [parts[0], h[:0], *parts[1:]]


def _merged_importance(h: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    parts = _pieces(h, k)
    stats = reference.merge_moments(torch.stack([reference.moments(p) for p in parts]))
    accs = [torch.zeros_like(p) for p in parts]
    flags = reference.importance_max_with_(accs, parts, stats.expand(len(parts), -1))
    return torch.cat(accs), flags


@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("n", [2, 7, *MULTI_CHUNK])
@pytest.mark.parametrize("mean, std", [(0.0, 1.0), (1e4, 1.0), (3e6, 0.5), (-2e3, 1e-2)])
def test_pieces_with_merged_statistics_get_the_whole_tensors_importance(n, mean, std, k):
    """Shards standardised with their merged moments: the rounded float64 oracle of the
    whole tensor."""
    h = _gradient(n, seed=n % 1000 + k, mean=mean, std=std)
    got, flags = _merged_importance(h, k)
    assert not bool(flags.any())
    _assert_correctly_rounded(got, h, float(torch.tensor(mean, dtype=torch.float32)))


@pytest.mark.parametrize("value", [0.0, 0.1, -3e6])
def test_constant_pieces_merge_to_exactly_zero(value):
    h = torch.full((2 * CHUNK + 5,), value)
    stats = reference.merge_moments(torch.stack([reference.moments(p) for p in _pieces(h, 3)]))
    assert float(stats[3]) == 0.0
    got, flags = _merged_importance(h, 3)
    assert not bool(flags.any()) and bool((got == 0).all())


def test_one_element_among_empty_pieces_gives_zero():
    h = torch.tensor([2.5])
    got, flags = _merged_importance(h, 1)
    assert got.tolist() == [0.0] and not bool(flags.any())
    stats = reference.merge_moments(torch.stack([reference.moments(h[:0]), reference.moments(h)]))
    assert stats.tolist() == [1.0, 2.5, 0.0, 0.0, 1.0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_piece_flags_every_piece_and_changes_nothing(bad):
    h = _gradient(3 * CHUNK, seed=3, mean=0.0, std=1.0)
    h[2 * CHUNK + 1] = bad
    parts = _pieces(h, 3)
    stats = reference.merge_moments(torch.stack([reference.moments(p) for p in parts]))
    accs = [torch.full_like(p, 0.25) for p in parts]
    flags = reference.importance_max_with_(accs, parts, stats.expand(len(parts), -1))
    assert bool(flags.all())
    assert all(bool((a == 0.25).all()) for a in accs)


def test_head_scale_of_shards_is_that_of_the_whole():
    """Two holders' shards, their float64 totals summed by ``reduce`` (as an all-reduce would)."""
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
