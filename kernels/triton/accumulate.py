"""Fused importance accumulation: ``A <- max(A, |tanh((h - mean h) / std h)|)`` for all tensors of
a model, in the stored keep domain (``spg_fast.storage``): ``stored <- min(stored, encode(1 -
|tanh(z)|))``, the same op as ``spg_fast.reference.accumulate_``.

Three launches per (gradient dtype, stored dtype) group, whatever the number of tensors:
1. ``_tile_stats``: one read of every gradient; per tile of ``BLOCK`` elements, two float64
   reductions: the sum and the centred sum of squares of the values shifted by a per-tensor pivot
   (the tensor's first element, so an offset mean costs no precision). The tile's count follows
   from its bounds; a non-finite value makes the sum non-finite; a constant tensor has M2
   exactly 0 (see ``_stats_tile``);
2. ``_combine``: per tensor, Chan's parallel combination of its tiles (deterministic: a fixed
   reduction order) into its moments, laid out as ``spg_fast.reference.moments``: count, pivot,
   mean less the pivot, centred sum of squares M2, finite (``moments`` stops here: FSDP2 merges
   the moments of every rank's shards before the update);
3. ``_update``: the standardisation from a tensor's (possibly merged) moments, as the reference
   forms it, then one read of every gradient and read-modify-write of its stored keep factors,
   skipping tensors that hold a non-finite value, which are flagged in the returned bool tensor
   without any host synchronisation (``accumulate_with_`` takes merged moments).
Statistics and the standardisation run in float64, and the keep factor ``1 - tanh(|z|)`` is formed
as ``2e / (1 + e)``, ``e = exp(-2|z|)`` (no cancellation; ``exp`` so that the same code runs under
``TRITON_INTERPRET=1``), so the float32 keep factor is the rounding of the exact value, as in
``spg_fast.reference``. The running minimum is taken on decoded values and encoded again, which is
exactly the minimum of the stored codes (every stored value decodes and encodes to itself).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from spg_fast.kernels.triton.custom_ops import device_guard
from spg_fast.kernels.triton.dtypes import GRAD_DTYPES, KEEP_DTYPES, check_dtypes, check_pairs
from spg_fast.kernels.triton.keep_codec import decode, encode
from spg_fast.kernels.triton.multi_tensor import (
    BLOCK,
    NUM_WARPS,
    TL_DTYPES,
    first_tiles,
    plan_for,
    write_back,
)
from spg_fast.kernels.triton.tiles import load, store, tensor_ptr, tile_of

_PARTIALS = 2  # per tile: the sum and the centred sum of squares of the pivot-shifted values
_MOMENTS = 5  # count, pivot, mean - pivot, M2, finite (spg_fast.reference.moments)
_COMBINE_BLOCK = 1024


@triton.jit
def _stats_tile(h, offs, inside, count, row, MASKED: tl.constexpr):
    # Shifted by the tensor's first element (exact in float64): a constant tensor gives exactly zero
    # deviations, so its M2 is exactly 0, which is the spec's constant rule without a min/max. A
    # non-finite value makes the sum non-finite (finite float32 values cannot overflow a float64
    # sum), which is the non-finite flag.
    d = tl.where(
        inside, load(h, offs, inside, MASKED).to(tl.float64) - tl.load(h).to(tl.float64), 0.0
    )
    total = tl.sum(d, axis=0)
    dev = tl.where(inside, d - total / count, 0.0)
    tl.store(row + 0, total)
    tl.store(row + 1, tl.sum(dev * dev, axis=0))


@triton.jit
def _tile_stats(
    h_ptrs,
    numels,
    tile_tensor,
    tile_start,
    partials,
    DT: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    t, offs, n, full = tile_of(tile_tensor, tile_start, numels, BLOCK)
    h = tensor_ptr(h_ptrs, t, DT, ALIGNED)
    row = partials + tl.program_id(0).to(tl.int64) * 2
    count = tl.minimum(n - tl.load(tile_start + tl.program_id(0)), BLOCK).to(tl.float64)
    if full:
        _stats_tile(h, offs, offs < n, count, row, False)
    else:
        _stats_tile(h, offs, offs < n, count, row, True)


@triton.jit
def _combine(
    partials,
    first_tile,
    n_tiles,
    numels,
    h_ptrs,
    moments,
    DT: tl.constexpr,
    BLOCK: tl.constexpr,
    CBLOCK: tl.constexpr,
):
    """Per tensor, Chan's combination of its tiles' (count, sum, M2) in a fixed order, written as
    its moments."""
    t = tl.program_id(0)
    first = tl.load(first_tile + t)
    tiles = tl.load(n_tiles + t)
    n = tl.load(numels + t).to(tl.float64)
    lane = tl.arange(0, CBLOCK)
    acc_s = tl.zeros([CBLOCK], dtype=tl.float64)
    for i in range(0, tiles, CBLOCK):
        live = i + lane < tiles
        acc_s += tl.load(partials + (first + i + lane) * 2, mask=live, other=0.0)
    total = tl.sum(acc_s, axis=0)
    mean = total / n
    acc_m2 = tl.zeros([CBLOCK], dtype=tl.float64)
    for i in range(0, tiles, CBLOCK):
        live = i + lane < tiles
        row = partials + (first + i + lane) * 2
        c = tl.minimum(n - (i + lane).to(tl.float64) * BLOCK, BLOCK)
        gap = tl.load(row + 0, mask=live, other=0.0) / tl.where(live, c, 1.0) - mean
        acc_m2 += tl.where(live, tl.load(row + 1, mask=live, other=0.0) + c * gap * gap, 0.0)
    out = moments + t.to(tl.int64) * 5
    tl.store(out + 0, n)
    tl.store(out + 1, tl.load(tensor_ptr(h_ptrs, t, DT, False)).to(tl.float64))
    tl.store(out + 2, mean)
    tl.store(out + 3, tl.sum(acc_m2, axis=0))
    tl.store(out + 4, tl.where(tl.abs(total) < float("inf"), 1.0, 0.0))


@triton.jit
def _update_tile(
    h, a_ptr, offs, inside, pivot, mean, inv_std, ADT: tl.constexpr, MASKED: tl.constexpr
):
    x = load(h, offs, inside, MASKED).to(tl.float64)
    z = tl.abs(x - pivot - mean) * inv_std
    e = tl.exp(-2.0 * z)
    # Rounded to float32, never to 0 (the smallest float32, 2**-149, has the bits 1): see
    # spg_fast.storage.
    keep = tl.maximum(
        (2.0 * e / (1.0 + e)).to(tl.float32), tl.full([1], 1, tl.int32).to(tl.float32, bitcast=True)
    )
    old = decode(load(a_ptr, offs, inside, MASKED), ADT)
    store(a_ptr, offs, encode(tl.minimum(old, keep), ADT), inside, MASKED)


@triton.jit
def _update(
    h_ptrs,
    a_ptrs,
    numels,
    tile_tensor,
    tile_start,
    stats,
    DT: tl.constexpr,
    ADT: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    t, offs, n, full = tile_of(tile_tensor, tile_start, numels, BLOCK)
    # The standardisation of the whole tensor from its moments, formed as the reference's
    # ``standardizer``: zero (importance 0) where the spec says so.
    row = stats + t * 5
    pivot = tl.load(row + 1)
    mean = tl.load(row + 2)
    m2 = tl.load(row + 3)
    safe = tl.where(m2 > 0.0, m2, 1.0)  # no division by zero where the result is masked anyway
    inv_std = 1.0 / tl.sqrt(safe / tl.maximum(tl.load(row + 0) - 1.0, 1.0))
    valid = (m2 > 0.0) & (tl.abs(m2) < float("inf")) & (tl.abs(mean) < float("inf"))
    valid = valid & (tl.abs(inv_std) < float("inf"))
    pivot = tl.where(valid, pivot, 0.0)
    mean = tl.where(valid, mean, 0.0)
    inv_std = tl.where(valid, inv_std, 0.0)
    h = tensor_ptr(h_ptrs, t, DT, ALIGNED)
    a_ptr = tensor_ptr(a_ptrs, t, ADT, ALIGNED)
    if tl.load(row + 4) != 0.0:  # a tensor holding a non-finite value is left untouched
        if full:
            _update_tile(h, a_ptr, offs, offs < n, pivot, mean, inv_std, ADT, False)
        else:
            _update_tile(h, a_ptr, offs, offs < n, pivot, mean, inv_std, ADT, True)


def _check(stored: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
    check_pairs("accumulate_", stored, grads, ("stored keep factors", "gradients"))
    check_dtypes("accumulate_", grads, GRAD_DTYPES, "gradient")
    check_dtypes("accumulate_", stored, KEEP_DTYPES, "stored keep factor")
    for i, (a, h) in enumerate(zip(stored, grads, strict=True)):
        if a.device != h.device or a.device != stored[0].device:
            raise ValueError(
                f"accumulate_: tensor {i} is on {h.device} / {a.device}, expected one device"
            )


def _group_moments(grads: list[Tensor]) -> Tensor:
    """The moments of non-empty gradients of one dtype: two launches."""
    device = grads[0].device
    plan, (hs,) = plan_for([grads], device)
    (h_ptrs,) = plan.pointers
    partials = torch.empty(plan.grid[0], _PARTIALS, dtype=torch.float64, device=device)
    dt = TL_DTYPES[hs[0].dtype]
    _tile_stats[plan.grid](
        h_ptrs,
        plan.numels,
        plan.tile_tensor,
        plan.tile_start,
        partials,
        DT=dt,
        BLOCK=BLOCK,
        ALIGNED=plan.aligned,
        num_warps=NUM_WARPS,
    )
    first, counts = first_tiles(hs, device)
    out = torch.empty(len(hs), _MOMENTS, dtype=torch.float64, device=device)
    _combine[(len(hs),)](
        partials,
        first,
        counts,
        plan.numels,
        h_ptrs,
        out,
        DT=dt,
        BLOCK=BLOCK,
        CBLOCK=_COMBINE_BLOCK,
        num_warps=NUM_WARPS,
    )
    return out


def _by_dtype(tensors: Sequence[Tensor], key: Any) -> list[list[int]]:
    """Positions of the non-empty tensors, grouped by ``key(i)``."""
    groups: dict[Any, list[int]] = {}
    for i, t in enumerate(tensors):
        if t.numel() > 0:
            groups.setdefault(key(i), []).append(i)
    return list(groups.values())


def moments(grads: list[Tensor]) -> Tensor:
    """The moments of each gradient (``[len(grads), 5]`` float64: count, pivot, mean less the pivot,
    M2, finite), as ``spg_fast.reference.moments`` gives them; zeros and finite for an empty one.
    Two launches per gradient dtype."""
    check_dtypes("moments", grads, GRAD_DTYPES, "gradient")
    device = grads[0].device if grads else torch.device("cpu")
    out = torch.zeros(len(grads), _MOMENTS, dtype=torch.float64, device=device)
    out[:, 4] = 1.0
    with device_guard(device):
        for idx in _by_dtype(grads, lambda i: grads[i].dtype):
            out[torch.tensor(idx, device=device)] = _group_moments([grads[i] for i in idx])
    return out


def accumulate_with_(stored: list[Tensor], grads: list[Tensor], stats: Tensor) -> Tensor:
    """``A <- max(A, importance)`` in the stored keep domain for each pair, standardised with the
    moments ``stats`` of each whole tensor (``[len(grads), 5]``, e.g. every rank's shards' moments
    merged), not the piece's own; returns the flags of tensors whose whole gradient is not finite
    (their stored keep factors are left untouched). ``spg_fast.reference.accumulate_with_``'s
    contract."""
    _check(stored, grads)
    if len(stats) != len(grads):
        raise ValueError(
            f"accumulate_with_: got {len(grads)} tensors but {len(stats)} rows of statistics"
        )
    device = stored[0].device if stored else torch.device("cpu")
    with device_guard(device):
        for idx in _by_dtype(grads, lambda i: (grads[i].dtype, stored[i].dtype)):
            rows = stats[torch.tensor(idx, device=stats.device)].to(device)
            _update_group([stored[i] for i in idx], [grads[i] for i in idx], rows)
    return stats[:, 4] == 0


def _update_group(accs: list[Tensor], grads: list[Tensor], stats: Tensor) -> None:
    """The update launch for tensors of one (gradient dtype, stored dtype)."""
    device = accs[0].device
    plan, (hs, work) = plan_for([grads, accs], device)
    h_ptrs, a_ptrs = plan.pointers
    _update[plan.grid](
        h_ptrs,
        a_ptrs,
        plan.numels,
        plan.tile_tensor,
        plan.tile_start,
        stats,
        DT=TL_DTYPES[hs[0].dtype],
        ADT=TL_DTYPES[work[0].dtype],
        BLOCK=BLOCK,
        ALIGNED=plan.aligned,
        num_warps=NUM_WARPS,
    )
    write_back(accs, work)


@torch.library.custom_op("spg_fast::accumulate_", mutates_args=("stored",))
def accumulate_(stored: list[Tensor], grads: list[Tensor]) -> Tensor:
    """Triton ``A <- max(A, importance(h))`` per pair in the stored keep domain; returns the bool
    flags of gradients with non-finite values (whose stored keep factors are left untouched). Same
    contract as ``spg_fast.reference.accumulate_``: three launches per (gradient dtype, stored
    dtype)."""
    _check(stored, grads)
    return accumulate_with_(stored, grads, moments(grads))


@accumulate_.register_fake
def _(stored: list[Tensor], grads: list[Tensor]) -> Tensor:
    device = stored[0].device if stored else torch.device("cpu")
    return torch.empty(len(grads), dtype=torch.bool, device=device)
