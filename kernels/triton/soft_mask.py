"""Soft mask of a whole model in one launch per gradient dtype: ``g <- g * (1 - A)`` for shared
gradients and ``g <- g * s`` for head gradients, ``s`` a device scalar. Reads ``A`` directly
(``1 - A`` is formed in registers, bit-identical to ``spg_fast.reference``), so no keep-factor
tensors are stored."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from spg_fast.kernels.triton.custom_ops import device_guard, in_place_op
from spg_fast.kernels.triton.dtypes import GRAD_DTYPES, IMPORTANCE_DTYPES, check_dtypes, check_pairs
from spg_fast.kernels.triton.multi_tensor import (
    BLOCK,
    NUM_WARPS,
    PLAN_CACHE_SIZE,
    TL_DTYPES,
    LaunchPlan,
    plan_for,
    write_back,
)
from spg_fast.kernels.triton.rounding import round_to
from spg_fast.kernels.triton.tiles import load, store, tensor_ptr, tile_of


@triton.jit
def _soft_mask_tile(
    g_ptr, a_ptr, scale_ptr, offs, inside, is_shared, GDT: tl.constexpr, MASKED: tl.constexpr
):
    g = load(g_ptr, offs, inside, MASKED).to(tl.float32)
    if is_shared:
        out = g * (1.0 - load(a_ptr, offs, inside, MASKED).to(tl.float32))
    else:
        out = g * tl.load(scale_ptr)
    store(g_ptr, offs, round_to(out, GDT), inside, MASKED)


@triton.jit
def _soft_mask(
    g_ptrs,
    a_ptrs,
    numels,
    tile_tensor,
    tile_start,
    scale_ptr,
    n_shared,
    GDT: tl.constexpr,
    ADT: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    t, offs, n, full = tile_of(tile_tensor, tile_start, numels, BLOCK)
    g_ptr = tensor_ptr(g_ptrs, t, GDT, ALIGNED)
    a_ptr = tensor_ptr(a_ptrs, t, ADT, ALIGNED)
    if full:
        _soft_mask_tile(g_ptr, a_ptr, scale_ptr, offs, offs < n, t < n_shared, GDT, False)
    else:
        _soft_mask_tile(g_ptr, a_ptr, scale_ptr, offs, offs < n, t < n_shared, GDT, True)


def _check(
    grads: Sequence[Tensor],
    importances: Sequence[Tensor],
    head_grads: Sequence[Tensor],
    scale: Tensor,
) -> None:
    check_pairs("soft_mask_", grads, importances, ("gradients", "importances"))
    check_dtypes("soft_mask_", importances, IMPORTANCE_DTYPES, "importance")
    check_dtypes("soft_mask_", [*grads, *head_grads], GRAD_DTYPES, "gradient")
    for i, g in enumerate([*grads, *head_grads]):
        if g.device != scale.device:
            raise ValueError(
                f"soft_mask_: gradient {i} is on {g.device}, the scale on {scale.device}"
            )
    if scale.numel() != 1 or scale.dtype != torch.float32:
        raise ValueError(
            f"soft_mask_: scale must be a one-element float32 tensor, got {tuple(scale.shape)} "
            f"{scale.dtype}"
        )


class _Launch(NamedTuple):
    plan: LaunchPlan
    n_shared: int
    gdt: tl.dtype
    adt: tl.dtype


# Launches by call signature (every tensor's data pointer, size and dtype, and the scale's pointer):
# a steady-state call skips the checks and the grouping by dtype, which cost more on the host than
# the launch itself.
_LAUNCHES: dict[tuple, list[_Launch]] = {}


def _call_key(
    grads: list[Tensor], importances: list[Tensor], head_grads: list[Tensor], scale: Tensor
) -> tuple:
    everything = (*grads, *head_grads, *importances)
    return (
        scale.data_ptr(),
        len(grads),
        len(head_grads),
        *map(Tensor.data_ptr, everything),
        *map(Tensor.numel, everything),
        *(t.dtype for t in everything),
    )


def _launch(
    grads: list[Tensor], importances: list[Tensor], head_grads: list[Tensor], scale: Tensor
) -> _Launch | None:
    """One launch for gradients of one dtype, shared ones first, then heads; returns it for reuse
    (None when it went through dense copies, which are made afresh each call)."""
    all_grads = [*grads, *head_grads]
    plan, (work_g, work_a) = plan_for([all_grads, importances], scale.device)
    adt = TL_DTYPES[work_a[0].dtype] if work_a else tl.float32
    launch = _Launch(plan, len(work_a), TL_DTYPES[work_g[0].dtype], adt)
    _run(launch, scale)
    write_back(all_grads, work_g)
    return launch if work_g is all_grads else None


def _run(launch: _Launch, scale: Tensor) -> None:
    plan = launch.plan
    g_ptrs, a_ptrs = plan.pointers
    _soft_mask[plan.grid](
        g_ptrs,
        a_ptrs,
        plan.numels,
        plan.tile_tensor,
        plan.tile_start,
        scale,
        launch.n_shared,
        GDT=launch.gdt,
        ADT=launch.adt,
        BLOCK=BLOCK,
        ALIGNED=plan.aligned,
        num_warps=NUM_WARPS,
    )


def _soft_mask_impl(
    grads: list[Tensor], importances: list[Tensor], head_grads: list[Tensor], scale: Tensor
) -> None:
    """Triton soft mask: ``g *= 1 - A`` per shared pair, ``g *= scale`` per head gradient, in place.

    One launch per gradient dtype present. Unlike ``spg_fast.reference.soft_mask_`` (which takes the
    keep factors ``1 - A``) this takes the importances ``A`` themselves.
    """
    if len(grads) == len(importances):
        launches = _LAUNCHES.get(key := _call_key(grads, importances, head_grads, scale))
        if launches is not None:
            with device_guard(scale.device):
                for launch in launches:
                    _run(launch, scale)
            return
    _check(grads, importances, head_grads, scale)
    groups: dict[torch.dtype, tuple[list[Tensor], list[Tensor], list[Tensor]]] = {}
    for g, a in zip(grads, importances, strict=True):
        if g.numel():
            entry = groups.setdefault((g.dtype, a.dtype), ([], [], []))
            entry[0].append(g)
            entry[1].append(a)
    for g in head_grads:
        if g.numel():
            group = next((k for k in groups if k[0] == g.dtype), (g.dtype, torch.float32))
            groups.setdefault(group, ([], [], []))[2].append(g)
    with device_guard(scale.device):
        launches = [_launch(shared, imps, heads, scale) for shared, imps, heads in groups.values()]
    if all(launches):
        _LAUNCHES[key] = launches
        if len(_LAUNCHES) > PLAN_CACHE_SIZE:
            del _LAUNCHES[next(iter(_LAUNCHES))]


soft_mask_ = in_place_op("soft_mask_", _soft_mask_impl, ("grads", "head_grads"))
