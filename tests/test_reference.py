"""The reference ops against a float64 oracle written independently in tests/helpers.py."""

from __future__ import annotations

import pytest
import torch

from spg_fast import reference, storage
from tests.helpers import oracle_importance
from tests.kernels.common import SPECIAL_KEEPS, keep64, keep_values, oracle_keep

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SHAPES = [(1, 2), (7,), (3, 5), (2, 3, 5, 7), (1023,), (33, 65)]
# The reference standardises in float64 and rounds once: a float32 result is within 2**-25 of the
# oracle (plus float64 noise, ~1e-11 here); float64 results agree with the two-pass oracle to 1e-12.
F32_ROUNDING = 2.0**-25 + 1e-9
ATOL = {
    torch.float32: F32_ROUNDING,
    torch.float64: 1e-12,
    torch.bfloat16: F32_ROUNDING,
    torch.float16: F32_ROUNDING,
}


def _random(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand((), generator=g) * 10 + 0.01
    offset = torch.randn((), generator=g) * 3
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_importance_matches_oracle(shape, dtype):
    h = _random(shape, dtype, seed=sum(shape) * 31 + DTYPES.index(dtype))
    got = reference.importance(h)
    assert got.dtype == reference.compute_dtype(dtype) and got.shape == h.shape
    torch.testing.assert_close(got.double(), oracle_importance(h), rtol=0, atol=ATOL[dtype])


@pytest.mark.parametrize("view", ["transpose", "stride", "offset"])
def test_importance_of_non_contiguous_views(view):
    base = _random((9, 14), torch.float32, seed=3)
    h = {"transpose": base.t(), "stride": base[::2, ::3], "offset": base[2:, 5:]}[view]
    assert not h.is_contiguous() or h.storage_offset() > 0
    torch.testing.assert_close(
        reference.importance(h).double(), oracle_importance(h), rtol=0, atol=F32_ROUNDING
    )


@pytest.mark.parametrize(
    "h",
    [
        torch.zeros(5, 3),
        torch.full((17,), 0.1),  # constant whose float32 mean is not exactly 0.1
        torch.full((4, 4), -3.7e5),
        torch.tensor([2.5]),
        torch.zeros(1, 1, 1),
    ],
)
def test_importance_is_zero_in_the_spec_edge_cases(h):
    got = reference.importance(h)
    assert torch.equal(got, torch.zeros_like(h))


def test_importance_of_empty_tensor():
    assert reference.importance(torch.empty(0, 3)).shape == (0, 3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_importance_rejects_non_finite(bad):
    h = torch.randn(4, 5)
    h[2, 3] = bad
    with pytest.raises(FloatingPointError, match=r"fc\.weight"):
        reference.importance(h, name="fc.weight")


def test_importance_rejects_integer_input():
    with pytest.raises(TypeError, match="floating-point"):
        reference.importance(torch.arange(5))


def test_importance_standardises_large_offsets():
    h = (
        torch.randn(100_001, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 1e4
    ).float()
    torch.testing.assert_close(
        reference.importance(h).double(), oracle_importance(h), rtol=0, atol=F32_ROUNDING
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_keep_is_one_minus_the_importance_without_cancellation(dtype):
    h = _random((4, 33), dtype, seed=DTYPES.index(dtype))
    keep = reference.keep(h)
    assert keep.dtype == reference.compute_dtype(dtype) and keep.shape == h.shape
    torch.testing.assert_close(keep.double(), oracle_keep(h), rtol=2.0**-23, atol=0)
    torch.testing.assert_close(keep.double(), 1 - oracle_importance(h), rtol=0, atol=2.0**-23)
    assert torch.equal(reference.keep(torch.full((5,), 0.3)), torch.ones(5))


# Stored formats by the keep dtype of the gradients they go with: float32 storage (float64 for
# float64 gradients), bfloat16 and uint8.
def _formats(dtype: torch.dtype) -> list[torch.dtype]:
    return [storage.stored_dtype(dtype, None), torch.bfloat16, torch.uint8]


@pytest.mark.parametrize("dtype", DTYPES)
def test_accumulate_takes_the_minimum_keep_and_flags_non_finite(dtype):
    shapes = [(5, 3), (1,), (8,), (0, 4), (6,), (40,)]
    for fmt in _formats(dtype):
        grads = [_random(s, dtype, seed=i) for i, s in enumerate(shapes)]
        grads[2][4] = float("nan")
        g = torch.Generator().manual_seed(3)
        stored = [storage.encode(keep_values(s, g), fmt) for s in shapes]
        before = [k.clone() for k in stored]
        flags = reference.accumulate_(stored, grads)
        assert flags.tolist() == [False, False, True, False, False, False]
        assert torch.equal(stored[2], before[2])
        for i in (0, 1, 3, 4, 5):
            new = storage.encode(reference.keep(grads[i]), fmt)
            assert stored[i].dtype == fmt
            assert torch.equal(stored[i], torch.minimum(before[i], new)), (fmt, i)
            want = torch.minimum(keep64(before[i]), oracle_keep(grads[i]))
            # the float32 keep is correctly rounded, then encoded: the format's relative error
            bound = storage.RELATIVE_ERROR[fmt] + 2.0**-23
            assert bool(((keep64(stored[i]) - want).abs() <= bound * want).all()), (fmt, i)


def test_accumulate_checks_pairing():
    with pytest.raises(ValueError, match="pair up"):
        reference.accumulate_([torch.ones(3)], [])
    with pytest.raises(ValueError, match=r"\(3,\) and \(4,\)"):
        reference.accumulate_([torch.ones(3)], [torch.zeros(4)])
    assert reference.accumulate_([], []).shape == (0,)


def _stored(shapes, fmt, g):
    stored = [storage.encode(keep_values(s, g), fmt) for s in shapes]
    return stored


@pytest.mark.parametrize("dtype", DTYPES)
def test_soft_mask_matches_oracle(dtype):
    g = torch.Generator().manual_seed(7)
    shapes = [(4, 7), (1,), (0, 3), (5, 2, 3)]
    for fmt in _formats(dtype):
        stored = _stored(shapes, fmt, g)
        grads = [torch.randn(s, generator=g).to(dtype) for s in shapes]
        grads[3] = torch.randn(3, 2, 5, generator=g).to(dtype).permute(2, 1, 0)  # non-contiguous
        head_grads = [
            torch.randn(3, 4, generator=g).to(dtype),
            torch.randn(9, generator=g).to(dtype),
        ]
        want = [gr.double() * keep64(k) for gr, k in zip(grads, stored, strict=True)]
        scale = reference.head_scale(stored)
        want_head = [h.double() * scale.double() for h in head_grads]

        reference.soft_mask_(grads, stored, head_grads, scale)
        eps, tiny = torch.finfo(dtype).eps, torch.finfo(dtype).smallest_normal
        for got, exp in zip(grads + head_grads, want + want_head, strict=True):
            assert got.dtype == dtype
            torch.testing.assert_close(got.double(), exp, rtol=eps, atol=tiny)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_updates_matches_oracle(dtype):
    """``p <- before + keep * (p - before)``: float32 (float64 for float64) forms the difference,
    the product and the sum, then one rounding to the parameter's dtype."""
    g = torch.Generator().manual_seed(8)
    shapes = [(4, 7), (1,), (0, 3), (5, 2, 3)]
    for fmt in _formats(dtype):
        stored = _stored(shapes, fmt, g)
        before = [torch.randn(s, generator=g).to(dtype) for s in shapes]
        params = [
            (b.double() + torch.randn(s, generator=g, dtype=torch.float64) * 0.1).to(dtype)
            for b, s in zip(before, shapes, strict=True)
        ]
        params[3] = params[3].permute(2, 1, 0).contiguous().permute(2, 1, 0)  # non-contiguous
        head_before = [torch.randn(9, generator=g).to(dtype)]
        heads = [(head_before[0].double() * 1.1).to(dtype)]
        scale = reference.head_scale(stored)
        factors = [keep64(k) for k in stored] + [scale.double().expand(9)]
        want = [
            b.double() + f * (p.double() - b.double())
            for p, b, f in zip(params + heads, before + head_before, factors, strict=True)
        ]
        kept_before = [b.clone() for b in before + head_before]
        reference.scale_updates_(params, before, stored, heads, head_before, scale)
        wide = torch.finfo(reference.compute_dtype(dtype)).eps / 2
        for got, exp, b in zip(params + heads, want, kept_before, strict=True):
            assert got.dtype == dtype
            bound = torch.finfo(dtype).eps / 2 * exp.abs() + 3 * wide * (
                b.double().abs() + exp.abs()
            )
            assert bool(((got.double() - exp).abs() <= bound).all()), (fmt, dtype)


def test_keep_factors_decode_every_format():
    k = torch.tensor(SPECIAL_KEEPS)
    for fmt in (torch.float32, torch.float64, torch.bfloat16, torch.uint8):
        (decoded,) = reference.keep_factors([storage.encode(k, fmt)])
        assert decoded.dtype == storage.keep_dtype(fmt)
        assert torch.equal(decoded.double(), keep64(storage.encode(k, fmt)))


def test_head_scale_is_the_mean_keep_over_all_elements():
    # a mean of per-tensor means would give 1 - 0.45
    stored = [torch.full((3,), 0.1), torch.ones(1)]
    torch.testing.assert_close(reference.head_scale(stored), torch.tensor(1 - 2.7 / 4))
    for fmt in (torch.bfloat16, torch.uint8):
        narrow = [storage.encode(k, fmt) for k in stored]
        want = float(sum(keep64(k).sum() for k in narrow)) / 4
        scale = reference.head_scale(narrow)
        assert scale.dtype == torch.float32 and float(scale) == pytest.approx(want, rel=2**-24)
    assert reference.head_scale([torch.ones(2, dtype=torch.float64)]).dtype == torch.float64
    with pytest.raises(ValueError, match="at least one"):
        reference.head_scale([])
