"""The reference ops against a float64 oracle written independently in tests/helpers.py."""

from __future__ import annotations

import pytest
import torch

from spg_fast import reference
from tests.helpers import oracle_importance

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
def test_importance_max_accumulates_and_flags_non_finite(dtype):
    grads = [_random(s, dtype, seed=i) for i, s in enumerate([(5, 3), (1,), (8,), (0, 4), (6,)])]
    grads[2][4] = float("nan")
    accs = [torch.rand(g.shape, dtype=reference.compute_dtype(dtype)) for g in grads]
    before = [a.clone() for a in accs]
    flags = reference.importance_max_(accs, grads)
    assert flags.tolist() == [False, False, True, False, False]
    assert torch.equal(accs[2], before[2])
    for i in (0, 1, 3, 4):
        want = torch.maximum(before[i].double(), oracle_importance(grads[i]))
        torch.testing.assert_close(accs[i].double(), want, rtol=0, atol=ATOL[dtype])


def test_importance_max_checks_pairing():
    with pytest.raises(ValueError, match="pair up"):
        reference.importance_max_([torch.zeros(3)], [])
    with pytest.raises(ValueError, match=r"\(3,\) and \(4,\)"):
        reference.importance_max_([torch.zeros(3)], [torch.zeros(4)])
    assert reference.importance_max_([], []).shape == (0,)


@pytest.mark.parametrize("dtype", DTYPES)
def test_soft_mask_matches_oracle(dtype):
    g = torch.Generator().manual_seed(7)
    shapes = [(4, 7), (1,), (0, 3), (5, 2, 3)]
    importances = [torch.rand(s, generator=g, dtype=reference.compute_dtype(dtype)) for s in shapes]
    importances[0][0, 0] = 1.0
    grads = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    grads[3] = torch.randn(3, 2, 5, generator=g).to(dtype).permute(2, 1, 0)  # non-contiguous
    head_grads = [torch.randn(3, 4, generator=g).to(dtype), torch.randn(9, generator=g).to(dtype)]
    want = [gr.double() * (1 - a.double()) for gr, a in zip(grads, importances, strict=True)]
    scale = reference.head_scale(importances)
    want_head = [h.double() * scale.double() for h in head_grads]

    reference.soft_mask_(grads, reference.keep_factors(importances), head_grads, scale)
    eps = torch.finfo(dtype).eps
    for got, exp in zip(grads + head_grads, want + want_head, strict=True):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), exp, rtol=eps, atol=0)


def test_head_scale_is_one_minus_the_mean_over_all_elements():
    a = [torch.full((3,), 0.9), torch.zeros(1)]  # a mean of per-tensor means would give 1 - 0.45
    torch.testing.assert_close(reference.head_scale(a), torch.tensor(1 - 2.7 / 4))
    with pytest.raises(ValueError, match="at least one"):
        reference.head_scale([])
