"""Pure-PyTorch reference implementation of SPG's tensor operations (see ``docs/semantics.md``).

These functions are the CPU backend and the oracle every Triton kernel is tested against. They run
on any device and any floating dtype, and compute in float32 or wider (the promotion of the input
dtype with float32).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from spg_fast import storage

__all__ = [
    "accumulate_",
    "accumulate_with_",
    "compute_dtype",
    "float64_sum",
    "head_scale",
    "importance",
    "keep",
    "keep_factors",
    "merge_moments",
    "moments",
    "moments_of",
    "scale_updates_",
    "soft_mask_",
    "standardizer",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype SPG computes and stores importance in for a tensor of ``dtype``: float32
    or wider.

    Args:
        dtype: the tensor's dtype.

    Returns:
        ``torch.promote_types(dtype, torch.float32)``: float32 for float32 and narrower dtypes,
            float64 for float64.
    """
    return torch.promote_types(dtype, torch.float32)


# Working-buffer length of the chunked float64 statistics. On the CPU 2**17 elements (1 MiB of
# float64, inside one core's 2 MiB L2): 2**16-2**18 measured alike, 2**14-2**15 up to 2x slower
# (chunks below torch's grain for splitting an op across threads). Elsewhere (a GPU; not measured)
# 2**22 (32 MiB): no cache holds a useful chunk there, so the chunk only bounds the temporary
# memory, and larger chunks mean fewer launches (240 for 1e9 elements).
_CPU_CHUNK = 1 << 17
_DEVICE_CHUNK = 1 << 22


def _chunk(device: torch.device) -> int:
    return _CPU_CHUNK if device.type == "cpu" else _DEVICE_CHUNK


def _spans(n: int, device: torch.device) -> list[tuple[int, int]]:
    step = _chunk(device)
    return [(lo, min(n, lo + step)) for lo in range(0, n, step)]


def _buffer(n: int, device: torch.device) -> Tensor:
    """The float64 working buffer for a tensor of ``n`` elements: one chunk, never a
    full-size copy."""
    return torch.empty(min(n, _chunk(device)), dtype=torch.float64, device=device)


def float64_sum(x: Tensor) -> Tensor:
    """The sum of ``x`` in float64 over chunks, with no full-size float64 copy
    (``x.sum(dtype=torch.float64)`` converts the whole tensor first on the CPU: 20 ms against 2.2 ms
    for 4.7M float32 elements on this machine, one thread).

    Args:
        x: a tensor of any shape, dtype and device; may be empty.

    Returns:
        A 0-dim float64 tensor on ``x``'s device (0 for an empty ``x``).
    """
    flat = x.reshape(-1)
    buf = _buffer(flat.numel(), x.device)
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for lo, hi in _spans(flat.numel(), x.device):
        total += buf[: hi - lo].copy_(flat[lo:hi]).sum()
    return total


class _Standardizer(NamedTuple):
    """``z = ((x - pivot) - mean) * inv_std`` in float64, and whether every ``x`` is finite (a
    0-dim bool).

    Where the spec makes the importance 0 (fewer than two elements, a constant tensor, a std of 0 or
    not finite) pivot, mean and inv_std are all 0, so ``z`` is 0 for every finite ``x``. All four
    are device tensors."""

    pivot: Tensor
    mean: Tensor
    inv_std: Tensor
    finite: Tensor


def _shifted_moments(x: Tensor, buf: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(pivot, sum, M2, finite)`` of the flat, non-empty tensor ``x`` in float64, one pass over
    chunks of ``buf``'s length: the sum and centred sum of squares M2 of ``x - pivot``, where the
    pivot is the first element.

    Shifting by the pivot before anything is summed makes a constant tensor exact zeros, so its M2
    is exactly 0, and a mean that dwarfs the spread costs no precision. Each chunk gives its sum and
    its own centred M2 (a second sweep while the chunk is in cache); the chunks are merged with
    Chan's formula. A float32 (or narrower) value shifted and summed in float64 cannot overflow, so
    the sum is non-finite exactly when some value is; float64 input is checked element by element.
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
    finite = torch.isfinite(x).all() if x.dtype == torch.float64 else torch.isfinite(total)
    return pivot, total, m2, finite


def _validated(
    pivot: Tensor, mean: Tensor, m2: Tensor, dof: float | Tensor, finite: Tensor
) -> _Standardizer:
    """The standardiser for these statistics (``dof``: the element count less one, at least 1),
    zeroed where the spec makes the importance 0."""
    inv_std = (m2 / dof).rsqrt()
    valid = (m2 > 0) & torch.isfinite(m2) & torch.isfinite(mean) & torch.isfinite(inv_std)
    zero = torch.zeros((), dtype=torch.float64, device=m2.device)
    return _Standardizer(*(torch.where(valid, v, zero) for v in (pivot, mean, inv_std)), finite)


def _standardizer(x: Tensor, buf: Tensor) -> _Standardizer:
    """The standardiser of the flat, non-empty tensor ``x`` (``_shifted_moments``)."""
    pivot, total, m2, finite = _shifted_moments(x, buf)
    return _validated(pivot, total / x.numel(), m2, max(x.numel() - 1, 1), finite)


def moments(h: Tensor) -> Tensor:
    """``[count, pivot, mean - pivot, M2, finite]`` of all elements of ``h`` in float64 (M2: the
    centred sum of squares; the pivot: the first element), computed as ``importance`` computes its
    statistics. These are what ``merge_moments`` merges, so that a tensor split into pieces (shards
    on several processes) gets the statistics of the whole, and what ``standardizer`` turns into the
    standardisation. The mean stays split into a pivot and a small offset, so that a mean which
    dwarfs the spread costs no precision.

    Args:
        h: a tensor of any shape and device; may be empty.

    Returns:
        A float64 tensor of shape ``[5]`` on ``h``'s device; ``finite`` is 1.0 or 0.0. Empty ``h``:
            zeros, finite.
    """
    if h.numel() == 0:
        return torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0], dtype=torch.float64, device=h.device)
    flat = h.reshape(-1)
    pivot, total, m2, finite = _shifted_moments(flat, _buffer(flat.numel(), h.device))
    n = torch.tensor(float(flat.numel()), dtype=torch.float64, device=h.device)
    return torch.stack([n, pivot, total / n, m2, finite.to(torch.float64)])


def moments_of(tensors: Sequence[Tensor]) -> Tensor:
    """``moments`` of each tensor, stacked: ``[len(tensors), 5]``.

    Args:
        tensors: tensors of any shapes, all on one device; may be empty.

    Returns:
        A float64 tensor ``[len(tensors), 5]`` whose row ``i`` is ``moments(tensors[i])``; no
            tensors give a ``[0, 5]`` tensor on the default device.
    """
    if not tensors:
        return torch.zeros(0, 5, dtype=torch.float64)
    return torch.stack([moments(t) for t in tensors])


def merge_moments(parts: Tensor) -> Tensor:
    """The ``moments`` of the concatenation of pieces, from theirs: ``parts[i, ..., :]`` are
    piece ``i``'s.

    Chan's pairwise formula, applied to the pieces in order, so that every process merging the same
    pieces gets bit-identical numbers. The result keeps the first non-empty piece's pivot; the
    difference of two pieces' means is taken as the difference of their pivots plus that of their
    offsets, so pieces with equal values (a constant tensor) merge to M2 = 0 exactly. Empty pieces
    are skipped; the result is finite only when every piece is.

    Args:
        parts: a float64 tensor ``[pieces, ..., 5]`` with at least one piece: each piece's
            ``moments`` (``moments_of`` of the pieces), with any batch dimensions in between.

    Returns:
        A float64 tensor ``parts.shape[1:]``: the ``moments`` of the concatenated pieces.
    """
    merged = parts[0].clone()
    for part in parts[1:]:
        n_a, n_b = merged[..., 0], part[..., 0]
        n = n_a + n_b
        safe = torch.where(n > 0, n, torch.ones_like(n))
        delta = (part[..., 1] - merged[..., 1]) + (part[..., 2] - merged[..., 2])
        offset = merged[..., 2] + delta * (n_b / safe)
        m2 = merged[..., 3] + part[..., 3] + delta.square() * (n_a * n_b / safe)
        joined = torch.stack([n, merged[..., 1], offset, m2], dim=-1)
        first = torch.where((n_b > 0)[..., None], joined, merged[..., :4])
        pick = torch.where((n_a > 0)[..., None], first, part[..., :4])
        merged = torch.cat([pick, torch.minimum(merged[..., 4:], part[..., 4:])], dim=-1)
    return merged


def standardizer(stats: Tensor) -> _Standardizer:
    """The standardiser of a whole tensor from its merged ``moments``.

    Args:
        stats: a float64 tensor ``[5]``: the tensor's ``moments``, or ``merge_moments`` of its
            pieces'.

    Returns:
        ``(pivot, mean, inv_std, finite)``, 0-dim tensors on ``stats``' device, for
            ``z = ((x - pivot) - mean) * inv_std``: pivot, mean and inv_std float64, all 0 where the
            spec makes the importance 0 (fewer than two elements, a constant tensor, a std of 0 or
            not finite); ``finite`` a bool.
    """
    return _validated(stats[1], stats[2], stats[3], (stats[0] - 1).clamp(min=1), stats[4] > 0)


def _standardized_chunks(
    x: Tensor, st: _Standardizer, buf: Tensor
) -> Iterator[tuple[int, int, Tensor]]:
    """``(lo, hi, |z|)`` for each chunk of the flat tensor ``x``, in float64 in ``buf``
    (overwritten by the next chunk)."""
    for lo, hi in _spans(x.numel(), x.device):
        b = buf[: hi - lo]
        b.copy_(x[lo:hi]).sub_(st.pivot).sub_(st.mean).mul_(st.inv_std).abs_()
        yield lo, hi, b


def _keep_(z: Tensor, scratch: Tensor) -> Tensor:
    """``1 - tanh(z)`` for ``z >= 0`` in place, as ``2e / (1 + e)`` with ``e = exp(-2z)``: no
    cancellation, so a keep factor far below float64's epsilon keeps its relative precision."""
    e = z.mul_(-2).exp_()
    denominator = torch.add(e, 1, out=scratch[: e.numel()])
    return e.mul_(2).div_(denominator)


def _rounded_keep(keep: Tensor, dtype: torch.dtype) -> Tensor:
    """``keep`` (float64) rounded to ``dtype``, never to 0: the importance of a finite gradient is
    below 1, so nothing is frozen outright (``spg_fast.storage.SMALLEST``)."""
    return keep.to(dtype).clamp_(min=storage.SMALLEST[dtype])


def _checked_flat(h: Tensor, name: str) -> tuple[Tensor, Tensor, _Standardizer]:
    if not h.is_floating_point():
        raise TypeError(f"{name}: importance needs a floating-point tensor, got dtype {h.dtype}")
    flat = h.reshape(-1)
    buf = _buffer(flat.numel(), h.device)
    st = _standardizer(flat, buf)
    if not bool(st.finite):
        raise FloatingPointError(f"{name}: gradient holds non-finite values (NaN or Inf)")
    return flat, buf, st


def importance(h: Tensor, name: str = "gradient") -> Tensor:
    """SPG importance of one accumulated gradient ``h``: ``|tanh(standardize(h))|``
    in ``compute_dtype``.

    Standardisation is over all elements with the unbiased std. An all-zero, constant or one-element
    ``h`` gives zeros. Statistics and standardisation run in float64 whatever the input, over chunks
    of at most ``_CPU_CHUNK`` (CPU) or ``_DEVICE_CHUNK`` elements, so the only error beyond float64
    rounding is the final rounding (at most 2**-25 absolute in float32), even for tensors whose mean
    dwarfs their spread.

    Args:
        h: the accumulated gradient: a floating-point tensor of any shape and device.
        name: what the errors call ``h``.

    Returns:
        A new tensor of ``h``'s shape in ``compute_dtype(h.dtype)`` on ``h``'s device, values in
            [0, 1] (an empty ``h`` gives an empty tensor).

    Raises:
        TypeError: a non-empty ``h`` is not floating point.
        FloatingPointError: ``h`` holds a non-finite value (NaN or Inf); the message names ``name``.
    """
    out = torch.empty(h.shape, dtype=compute_dtype(h.dtype), device=h.device)
    if h.numel() == 0:
        return out
    flat, buf, st = _checked_flat(h, name)
    for lo, hi, z in _standardized_chunks(flat, st, buf):
        out.view(-1)[lo:hi].copy_(z.tanh_())
    return out


def keep(h: Tensor, name: str = "gradient") -> Tensor:
    """The keep factor ``1 - importance(h)`` in ``compute_dtype``, formed in float64 without
    cancellation (``spg_fast.storage``) and rounded once, never to 0: the reference float32 keep
    factor.

    Args:
        h: the accumulated gradient: a floating-point tensor of any shape and device.
        name: what the errors call ``h``.

    Returns:
        A new tensor of ``h``'s shape in ``compute_dtype(h.dtype)`` on ``h``'s device, values in
            (0, 1] (an empty ``h`` gives an empty tensor).

    Raises:
        TypeError: a non-empty ``h`` is not floating point.
        FloatingPointError: ``h`` holds a non-finite value (NaN or Inf); the message names ``name``.
    """
    out = torch.empty(h.shape, dtype=compute_dtype(h.dtype), device=h.device)
    if h.numel() == 0:
        return out
    flat, buf, st = _checked_flat(h, name)
    scratch = torch.empty_like(buf)
    for lo, hi, z in _standardized_chunks(flat, st, buf):
        out.view(-1)[lo:hi].copy_(_rounded_keep(_keep_(z, scratch), out.dtype))
    return out


def _check_lists(what: str, first: Sequence[Tensor], second: Sequence[Tensor]) -> None:
    if len(first) != len(second):
        raise ValueError(
            f"{what}: got {len(first)} and {len(second)} tensors; the lists must pair up"
        )
    for i, (a, b) in enumerate(zip(first, second, strict=True)):
        if a.shape != b.shape:
            raise ValueError(f"{what}: tensor {i} has shapes {tuple(a.shape)} and {tuple(b.shape)}")


def _accumulate_one(stored: Tensor, h: Tensor, st: _Standardizer | None = None) -> Tensor:
    """``stored <- min(stored, encode(keep(h)))`` unless ``h`` holds a non-finite value; returns
    that flag (0-dim bool). ``st``: the standardiser to use (default: ``h``'s own statistics)."""
    if h.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=h.device) if st is None else ~st.finite
    flat = h.reshape(-1)
    buf = _buffer(flat.numel(), h.device)
    if st is None:
        st = _standardizer(flat, buf)
    # On the CPU reading the flag costs nothing; elsewhere ``where`` keeps the update free of
    # host synchronisation.
    on_cpu = h.device.type == "cpu"
    if on_cpu and not bool(st.finite):
        return ~st.finite
    work = stored.view(-1) if stored.is_contiguous() else stored.reshape(-1)
    # The keep factor is rounded once to compute_dtype(h.dtype), as the kernels do, then encoded.
    rounding = compute_dtype(h.dtype)
    scratch = torch.empty_like(buf)
    for lo, hi, z in _standardized_chunks(flat, st, buf):
        code = storage.encode(_rounded_keep(_keep_(z, scratch), rounding), stored.dtype)
        a = work[lo:hi]
        if on_cpu:
            torch.minimum(a, code, out=a)
        else:
            a.copy_(torch.where(st.finite, torch.minimum(a, code), a))
    if not stored.is_contiguous():
        stored.copy_(work.view(stored.shape))
    return ~st.finite


def accumulate_(stored: Sequence[Tensor], grads: Sequence[Tensor]) -> Tensor:
    """``A <- max(A, importance(h))`` in the stored keep domain (``spg_fast.storage``): ``stored <-
    min(stored, encode(keep(h)))`` for each pair; returns a bool tensor flagging the non-finite
    ``h``.

    Stored keep factors whose gradient holds a non-finite value are left untouched, and their flag
    is set, so the caller can report it without a host synchronisation per tensor.

    Args:
        stored: stored keep factors in any ``spg_fast.storage`` format, updated in place.
        grads: the accumulated gradients ``h`` (floating point), one per stored tensor, of its shape
            and on its device.

    Returns:
        A bool tensor ``[len(grads)]``, True where ``h`` holds a non-finite value (no tensors: an
            empty tensor on the default device).

    Raises:
        ValueError: the two lists differ in length, or a pair in shape.
    """
    _check_lists("accumulate_", stored, grads)
    flags = [_accumulate_one(k, h) for k, h in zip(stored, grads, strict=True)]
    if not flags:
        return torch.zeros(0, dtype=torch.bool)
    return torch.stack(flags)


def accumulate_with_(stored: Sequence[Tensor], grads: Sequence[Tensor], stats: Tensor) -> Tensor:
    """``accumulate_`` for pieces of larger tensors, with the statistics of each whole tensor
    given (``stats[i]``: its merged ``moments``), not those of the piece ``h``. A whole tensor that
    is not finite leaves its piece's stored keep factors untouched and sets its flag.

    Args:
        stored: the pieces' stored keep factors (any ``spg_fast.storage`` format), updated in place.
        grads: the pieces ``h`` of the accumulated gradients, one per stored tensor, of its shape.
        stats: a float64 tensor ``[len(grads), 5]``, row ``i`` for the whole tensor ``grads[i]``
            is a piece of.

    Returns:
        A bool tensor ``[len(grads)]``, True where the whole tensor holds a non-finite value (no
            tensors: an empty tensor on the default device).

    Raises:
        ValueError: ``stored`` and ``grads`` differ in length or a pair in shape, or ``stats`` has
            not one row per gradient.
    """
    _check_lists("accumulate_with_", stored, grads)
    if len(stats) != len(grads):
        raise ValueError(
            f"accumulate_with_: got {len(grads)} tensors but {len(stats)} rows of statistics"
        )
    flags = [
        _accumulate_one(k, h, standardizer(row))
        for k, h, row in zip(stored, grads, stats, strict=True)
    ]
    return torch.stack(flags) if flags else torch.zeros(0, dtype=torch.bool)


def keep_factors(stored: Sequence[Tensor]) -> list[Tensor]:
    """The keep factors ``1 - A`` that stored importance stands for (``spg_fast.storage.decode``):
    what each shared gradient or update is multiplied by.

    Args:
        stored: stored keep factors in any ``spg_fast.storage`` format.

    Returns:
        One tensor per stored tensor, in ``storage.keep_dtype`` of its dtype: the stored tensor
            itself for float32 and float64 storage, a new tensor otherwise.
    """
    return [storage.decode(k) for k in stored]


def head_scale(
    stored: Sequence[Tensor],
    *,
    numel: int | None = None,
    reduce: Callable[[Tensor], None] | None = None,
) -> Tensor:
    """``1 - mean(A)``, the mean keep factor over all elements of all stored tensors taken
    together, as a 0-dim tensor in the widest keep dtype (float32; float64 for float64 storage, as
    the authors' code keeps a float64 model's).

    The sum is taken in float64 so that the mean of a billion-element model is exact to float32
    precision.

    Args:
        stored: the stored keep factors (any ``spg_fast.storage`` format), all on one device; for
            shards of larger tensors, this process's shards.
        numel: the element count of the whole tensors (None: the elements of ``stored``).
        reduce: called with the 0-dim float64 total to sum it across the shards' holders in place
            (an all-reduce); None: no reduction.

    Returns:
        The mean keep factor, a 0-dim tensor on the stored tensors' device.

    Raises:
        ValueError: ``stored`` is empty, or the element count is 0.
    """
    if not stored:
        raise ValueError("head_scale needs at least one stored importance tensor")
    total_numel = sum(k.numel() for k in stored) if numel is None else numel
    if total_numel == 0:
        raise ValueError("head_scale: the importance tensors hold no elements")
    total = torch.stack([float64_sum(storage.decode(k)) for k in stored]).sum()
    if reduce is not None:
        reduce(total)
    dtype = functools.reduce(torch.promote_types, (storage.keep_dtype(k.dtype) for k in stored))
    return (total / total_numel).to(dtype)


def _expanded(scale: Tensor, tensors: Sequence[Tensor]) -> list[Tensor]:
    # A 0-dim tensor does not take part in type promotion, so multiplying a bfloat16 tensor by it
    # would first round the scale to bfloat16; an expanded view promotes like any tensor and keeps
    # the product in float32.
    return [scale.expand(t.shape) for t in tensors]


def soft_mask_(
    grads: Sequence[Tensor], stored: Sequence[Tensor], head_grads: Sequence[Tensor], scale: Tensor
) -> None:
    """In place: ``g <- g * keep`` for each shared gradient, ``g <- g * scale`` for each
    head gradient.

    Nothing here synchronises with the host. Products are formed in float32 (or wider) and rounded
    once to the gradient's dtype.

    Args:
        grads: the shared parameters' gradients, multiplied in place.
        stored: their stored keep factors, one per gradient, of its shape (any ``spg_fast.storage``
            format; decoded here, float32 and float64 storage used as it is).
        head_grads: the head parameters' gradients, multiplied in place.
        scale: ``head_scale``, a 0-dim device tensor.

    Raises:
        ValueError: ``grads`` and ``stored`` differ in length, or a pair in shape.
    """
    _check_lists("soft_mask_", grads, stored)
    if grads:
        torch._foreach_mul_(list(grads), keep_factors(stored))
    if head_grads:
        torch._foreach_mul_(list(head_grads), _expanded(scale, head_grads))


def _scale_changes_(params: list[Tensor], before: list[Tensor], factors: list[Tensor]) -> None:
    """``p <- before + factor * (p - before)`` per triple: the difference, the product and the sum
    each rounded to ``compute_dtype`` (as the kernels form them, so that both give the same bits),
    then rounded once to the parameter's dtype. ``before`` may be clobbered."""
    wide = [i for i, p in enumerate(params) if compute_dtype(p.dtype) == p.dtype]
    if wide:
        ps, bs = [params[i] for i in wide], [before[i] for i in wide]
        torch._foreach_sub_(ps, bs)
        torch._foreach_mul_(ps, [factors[i] for i in wide])
        torch._foreach_add_(ps, bs)
    for i in sorted(set(range(len(params))) - set(wide)):
        p, b = params[i], before[i].to(compute_dtype(params[i].dtype))
        p.copy_((p.to(b.dtype) - b).mul_(factors[i]).add_(b))


@torch.no_grad()
def scale_updates_(
    params: Sequence[Tensor],
    before: Sequence[Tensor],
    stored: Sequence[Tensor],
    head_params: Sequence[Tensor],
    head_before: Sequence[Tensor],
    scale: Tensor,
) -> None:
    """In place, the update mask: ``p <- p_before + keep * (p - p_before)`` for each shared
    parameter, ``p <- p_before + scale * (p - p_before)`` for each head, where ``before`` holds the
    values before the optimizer's step (and may be overwritten here).

    Args:
        params: the shared parameters after the optimizer's step, changed in place.
        before: one tensor per parameter, of its shape.
        stored: their stored keep factors, one per parameter, of its shape (any
            ``spg_fast.storage`` format).
        head_params: the head parameters after the step, changed in place.
        head_before: the head parameters' values before the step, one per head parameter.
        scale: ``head_scale``, a 0-dim device tensor.

    Raises:
        ValueError: ``params``, ``before`` and ``stored`` differ in length or a triple in shape, or
            ``head_params`` and ``head_before`` differ in length or a pair in shape.
    """
    _check_lists("scale_updates_", params, stored)
    _check_lists("scale_updates_", params, before)
    _check_lists("scale_updates_", head_params, head_before)
    if params:
        _scale_changes_(list(params), list(before), keep_factors(stored))
    if head_params:
        _scale_changes_(list(head_params), list(head_before), _expanded(scale, head_params))
