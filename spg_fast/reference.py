"""Pure-PyTorch reference implementation of SPG's tensor operations (see ``docs/semantics.md``).

These functions are the CPU backend and the oracle every Triton kernel is tested against. They run on any device
and any floating dtype, and compute in float32 or wider (the promotion of the input dtype with float32).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "compute_dtype",
    "head_scale",
    "importance",
    "importance_max_",
    "keep_factors",
    "soft_mask_",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype SPG computes and stores importance in for a tensor of ``dtype``: float32 or wider."""
    return torch.promote_types(dtype, torch.float32)


def _standardized_importance(x: Tensor) -> Tensor:
    """``|tanh((x - mean) / std)|`` with the spec's zero cases, returned in ``compute_dtype(x.dtype)``.

    Statistics and standardisation run in float64 whatever the input, so the only error is the final rounding
    (at most 2**-25 absolute in float32), even for tensors whose mean dwarfs their spread. A tensor of fewer than
    two elements, a constant tensor and one whose std is not finite get importance 0. Non-finite values of ``x``
    are not checked here (the result is then undefined).
    """
    out_dtype = compute_dtype(x.dtype)
    if x.numel() < 2:
        return torch.zeros_like(x, dtype=out_dtype)
    x = x.to(torch.float64)
    var, mean = torch.var_mean(x, correction=1)
    std = var.sqrt()
    # A constant tensor has std 0 mathematically, but a rounded mean can differ from the constant by an ulp:
    # compare the extremes so that such a tensor is recognised exactly.
    lo, hi = torch.aminmax(x)
    valid = (hi > lo) & (std > 0) & torch.isfinite(std)
    z = (x - mean) / torch.where(valid, std, torch.ones_like(std))
    return torch.where(valid, z.tanh().abs(), torch.zeros_like(z)).to(out_dtype)


def importance(h: Tensor, name: str = "gradient") -> Tensor:
    """SPG importance of one accumulated gradient ``h``: ``|tanh(standardize(h))|`` in ``compute_dtype``.

    Standardisation is over all elements with the unbiased std. An all-zero, constant or one-element ``h`` gives
    zeros. A non-finite value in ``h`` raises ``FloatingPointError`` naming ``name``.
    """
    if not h.is_floating_point():
        raise TypeError(f"{name}: importance needs a floating-point tensor, got dtype {h.dtype}")
    if not bool(torch.isfinite(h).all()):
        raise FloatingPointError(f"{name}: gradient holds non-finite values (NaN or Inf)")
    return _standardized_importance(h)


def _check_lists(what: str, first: Sequence[Tensor], second: Sequence[Tensor]) -> None:
    if len(first) != len(second):
        raise ValueError(f"{what}: got {len(first)} and {len(second)} tensors; the lists must pair up")
    for i, (a, b) in enumerate(zip(first, second, strict=True)):
        if a.shape != b.shape:
            raise ValueError(f"{what}: tensor {i} has shapes {tuple(a.shape)} and {tuple(b.shape)}")


def importance_max_(accumulators: Sequence[Tensor], grads: Sequence[Tensor]) -> Tensor:
    """``A <- max(A, importance(h))`` for each pair; returns a bool tensor flagging the non-finite ``h``.

    An accumulator whose gradient holds a non-finite value is left untouched, and its flag is set, so the caller
    can report it without a host synchronisation per tensor.
    """
    _check_lists("importance_max_", accumulators, grads)
    flags = []
    for acc, h in zip(accumulators, grads, strict=True):
        finite = torch.isfinite(h).all()
        updated = torch.maximum(acc, _standardized_importance(h).to(acc.dtype))
        acc.copy_(torch.where(finite, updated, acc))
        flags.append(~finite)
    if not flags:
        return torch.zeros(0, dtype=torch.bool)
    return torch.stack(flags)


def keep_factors(importances: Sequence[Tensor]) -> list[Tensor]:
    """``1 - A`` in ``compute_dtype`` for each accumulated importance: what each shared gradient is multiplied by."""
    return [torch.rsub(a.to(compute_dtype(a.dtype)), 1) for a in importances]


def head_scale(importances: Sequence[Tensor]) -> Tensor:
    """``1 - mean(A)`` over all elements of all importances taken together, as a float32 0-dim tensor.

    The sum is taken in float64 so that the mean of a billion-element model is exact to float32 precision.
    """
    if not importances:
        raise ValueError("head_scale needs at least one importance tensor")
    total = sum(a.numel() for a in importances)
    if total == 0:
        raise ValueError("head_scale: the importance tensors hold no elements")
    sums = torch.stack([a.sum(dtype=torch.float64) for a in importances])
    return (1 - sums.sum() / total).to(torch.float32)


def soft_mask_(grads: Sequence[Tensor], keeps: Sequence[Tensor], head_grads: Sequence[Tensor],
               scale: Tensor) -> None:
    """In place: ``g <- g * keep`` for each shared gradient, ``g <- g * scale`` for each head gradient.

    ``keeps`` are the ``keep_factors`` of the shared parameters and ``scale`` is ``head_scale``, a device tensor:
    nothing here synchronises with the host. Products are formed in float32 (or wider) and rounded once to the
    gradient's dtype.
    """
    _check_lists("soft_mask_", grads, keeps)
    if grads:
        torch._foreach_mul_(list(grads), list(keeps))
    if head_grads:
        # A 0-dim tensor does not take part in type promotion, so multiplying a bfloat16 gradient by it would first
        # round the scale to bfloat16; an expanded view promotes like any tensor and keeps the product in float32.
        torch._foreach_mul_(list(head_grads), [scale.expand(h.shape) for h in head_grads])
