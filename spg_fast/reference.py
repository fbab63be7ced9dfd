"""Pure-PyTorch reference implementation of SPG's tensor operations (see ``docs/semantics.md``).

These functions are the CPU backend and the oracle every Triton kernel is tested against. They run on any device
and any floating dtype, and compute in float32 or wider (the promotion of the input dtype with float32).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import NamedTuple

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


# Working-buffer length of the chunked float64 statistics. On the CPU 2**17 elements (1 MiB of float64, inside one
# core's 2 MiB L2): 2**16-2**18 measured alike, 2**14-2**15 up to 2x slower (chunks below torch's grain for
# splitting an op across threads). Elsewhere (a GPU; not measured) 2**22 (32 MiB): no cache holds a useful chunk
# there, so the chunk only bounds the temporary memory, and larger chunks mean fewer launches (240 for 1e9 elements).
_CPU_CHUNK = 1 << 17
_DEVICE_CHUNK = 1 << 22


def _chunk(device: torch.device) -> int:
    return _CPU_CHUNK if device.type == "cpu" else _DEVICE_CHUNK


def _spans(n: int, device: torch.device) -> list[tuple[int, int]]:
    step = _chunk(device)
    return [(lo, min(n, lo + step)) for lo in range(0, n, step)]


def _buffer(n: int, device: torch.device) -> Tensor:
    """The float64 working buffer for a tensor of ``n`` elements: one chunk, never a full-size copy."""
    return torch.empty(min(n, _chunk(device)), dtype=torch.float64, device=device)


def _sum64(x: Tensor) -> Tensor:
    """The sum of ``x`` in float64 over chunks (``x.sum(dtype=torch.float64)`` converts the whole tensor first on
    the CPU: 20 ms against 2.2 ms for 4.7M float32 elements on this machine, one thread)."""
    flat = x.reshape(-1)
    buf = _buffer(flat.numel(), x.device)
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for lo, hi in _spans(flat.numel(), x.device):
        total += buf[: hi - lo].copy_(flat[lo:hi]).sum()
    return total


class _Standardizer(NamedTuple):
    """``z = ((x - pivot) - mean) * inv_std`` in float64, and whether every ``x`` is finite (a 0-dim bool).

    Where the spec makes the importance 0 (fewer than two elements, a constant tensor, a std of 0 or not finite)
    pivot, mean and inv_std are all 0, so ``z`` is 0 for every finite ``x``. All four are device tensors."""

    pivot: Tensor
    mean: Tensor
    inv_std: Tensor
    finite: Tensor


def _standardizer(x: Tensor, buf: Tensor) -> _Standardizer:
    """The statistics of the flat, non-empty tensor ``x`` in float64, one pass over chunks of ``buf``'s length.

    Values are shifted by the first element (the pivot) before anything is summed: a constant tensor shifts to
    exact zeros, so its centred sum of squares M2 is exactly 0, and a mean that dwarfs the spread costs no
    precision. Each chunk gives its sum and its own centred M2 (a second sweep while the chunk is in cache); the
    chunks are merged with Chan's formula. A float32 (or narrower) value shifted and summed in float64 cannot
    overflow, so the sum is non-finite exactly when some value is; float64 input is checked element by element.
    """
    n = x.numel()
    pivot = x[0].to(torch.float64)
    spans = _spans(n, x.device)
    sums, m2s = [], []
    for lo, hi in spans:
        b = buf[: hi - lo]
        b.copy_(x[lo:hi]).sub_(pivot)
        s = b.sum()
        b.sub_(s / (hi - lo))
        sums.append(s)
        m2s.append(torch.dot(b, b))
    if len(spans) == 1:
        total, m2 = sums[0], m2s[0]
    else:
        chunk_sums = torch.stack(sums)
        counts = torch.full_like(chunk_sums, float(spans[0][1]))
        counts[-1] = spans[-1][1] - spans[-1][0]
        total = chunk_sums.sum()
        m2 = torch.stack(m2s).sum() + ((chunk_sums - counts * (total / n)).square() / counts).sum()
    mean = total / n
    finite = torch.isfinite(x).all() if x.dtype == torch.float64 else torch.isfinite(total)
    inv_std = (m2 / max(n - 1, 1)).rsqrt()
    valid = (m2 > 0) & torch.isfinite(m2) & torch.isfinite(mean) & torch.isfinite(inv_std)
    zero = torch.zeros((), dtype=torch.float64, device=x.device)
    return _Standardizer(*(torch.where(valid, v, zero) for v in (pivot, mean, inv_std)), finite)


def _standardized_chunks(x: Tensor, st: _Standardizer, buf: Tensor) -> Iterator[tuple[int, int, Tensor]]:
    """``(lo, hi, |tanh(z)|)`` for each chunk of the flat tensor ``x``, in float64 in ``buf`` (overwritten by the
    next chunk)."""
    for lo, hi in _spans(x.numel(), x.device):
        b = buf[: hi - lo]
        b.copy_(x[lo:hi]).sub_(st.pivot).sub_(st.mean).mul_(st.inv_std).abs_().tanh_()
        yield lo, hi, b


def importance(h: Tensor, name: str = "gradient") -> Tensor:
    """SPG importance of one accumulated gradient ``h``: ``|tanh(standardize(h))|`` in ``compute_dtype``.

    Standardisation is over all elements with the unbiased std. An all-zero, constant or one-element ``h`` gives
    zeros. A non-finite value in ``h`` raises ``FloatingPointError`` naming ``name``. Statistics and
    standardisation run in float64 whatever the input, over chunks of at most ``_CPU_CHUNK`` (CPU) or
    ``_DEVICE_CHUNK`` elements, so the only error beyond float64 rounding is the final rounding (at most 2**-25
    absolute in float32), even for tensors whose mean dwarfs their spread.
    """
    if not h.is_floating_point():
        raise TypeError(f"{name}: importance needs a floating-point tensor, got dtype {h.dtype}")
    out = torch.empty(h.shape, dtype=compute_dtype(h.dtype), device=h.device)
    if h.numel() == 0:
        return out
    flat, out_flat = h.reshape(-1), out.view(-1)
    buf = _buffer(flat.numel(), h.device)
    st = _standardizer(flat, buf)
    if not bool(st.finite):
        raise FloatingPointError(f"{name}: gradient holds non-finite values (NaN or Inf)")
    for lo, hi, g in _standardized_chunks(flat, st, buf):
        out_flat[lo:hi].copy_(g)
    return out


def _check_lists(what: str, first: Sequence[Tensor], second: Sequence[Tensor]) -> None:
    if len(first) != len(second):
        raise ValueError(f"{what}: got {len(first)} and {len(second)} tensors; the lists must pair up")
    for i, (a, b) in enumerate(zip(first, second, strict=True)):
        if a.shape != b.shape:
            raise ValueError(f"{what}: tensor {i} has shapes {tuple(a.shape)} and {tuple(b.shape)}")


def _importance_max_one(acc: Tensor, h: Tensor) -> Tensor:
    """``acc <- max(acc, importance(h))`` unless ``h`` holds a non-finite value; returns that flag (0-dim bool)."""
    if h.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=h.device)
    flat = h.reshape(-1)
    buf = _buffer(flat.numel(), h.device)
    st = _standardizer(flat, buf)
    # On the CPU reading the flag costs nothing; elsewhere ``where`` keeps the update free of host synchronisation.
    on_cpu = h.device.type == "cpu"
    if on_cpu and not bool(st.finite):
        return ~st.finite
    work = acc.view(-1) if acc.is_contiguous() else acc.reshape(-1)
    # The importance is rounded once to compute_dtype(h.dtype), as the kernels do, before the max (for a float32
    # A that also keeps the max in float32, where a float64 operand would make torch form a float64 temporary).
    out_dtype = compute_dtype(h.dtype)
    rounded = torch.empty_like(buf, dtype=out_dtype) if out_dtype != torch.float64 else None
    for lo, hi, z in _standardized_chunks(flat, st, buf):
        g = z if rounded is None else rounded[: hi - lo].copy_(z)
        a = work[lo:hi]
        if on_cpu:
            torch.maximum(a, g, out=a)
        else:
            a.copy_(torch.where(st.finite, torch.maximum(a, g), a))
    if not acc.is_contiguous():
        acc.copy_(work.view(acc.shape))
    return ~st.finite


def importance_max_(accumulators: Sequence[Tensor], grads: Sequence[Tensor]) -> Tensor:
    """``A <- max(A, importance(h))`` for each pair; returns a bool tensor flagging the non-finite ``h``.

    An accumulator whose gradient holds a non-finite value is left untouched, and its flag is set, so the caller
    can report it without a host synchronisation per tensor.
    """
    _check_lists("importance_max_", accumulators, grads)
    flags = [_importance_max_one(acc, h) for acc, h in zip(accumulators, grads, strict=True)]
    if not flags:
        return torch.zeros(0, dtype=torch.bool)
    return torch.stack(flags)


def keep_factors(importances: Sequence[Tensor]) -> list[Tensor]:
    """``1 - A`` in ``compute_dtype`` for each accumulated importance: what each shared gradient is multiplied by."""
    return [torch.rsub(a.to(compute_dtype(a.dtype)), 1) for a in importances]


def head_scale(importances: Sequence[Tensor]) -> Tensor:
    """``1 - mean(A)`` over all elements of all importances taken together, as a 0-dim tensor in the widest
    ``compute_dtype`` of the importances (float32; float64 for a float64 model, as the authors' code keeps it).

    The sum is taken in float64 so that the mean of a billion-element model is exact to float32 precision.
    """
    if not importances:
        raise ValueError("head_scale needs at least one importance tensor")
    total = sum(a.numel() for a in importances)
    if total == 0:
        raise ValueError("head_scale: the importance tensors hold no elements")
    sums = torch.stack([_sum64(a) for a in importances])
    dtype = functools.reduce(torch.promote_types, (compute_dtype(a.dtype) for a in importances))
    return (1 - sums.sum() / total).to(dtype)


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
