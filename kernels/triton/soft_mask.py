"""SPG's mask applied in place to a whole model, one launch per dtype: to gradients,
``g <- g * keep`` (``soft_mask_``), or to the change an optimizer step made,
``p <- before + keep * (p - before)`` (``scale_updates_``). ``keep`` is the stored keep factor of a
shared tensor (``spg_fast.storage``, decoded in registers, bit-identical to
``spg_fast.reference``) or the head scale, a device scalar, for a head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from spg_fast.kernels.triton.custom_ops import device_guard, in_place_op
from spg_fast.kernels.triton.dtypes import GRAD_DTYPES, KEEP_DTYPES, check_dtypes, check_pairs
from spg_fast.kernels.triton.masked_step import kept
from spg_fast.kernels.triton.multi_tensor import BLOCK, NUM_WARPS, TL_DTYPES, plan_for, write_back
from spg_fast.kernels.triton.rounding import round_to
from spg_fast.kernels.triton.tiles import load, store, tensor_ptr, tile_of


@triton.jit
def _soft_mask_tile(
    x_ptr,
    b_ptr,
    a_ptr,
    scale_ptr,
    offs,
    inside,
    is_shared,
    XDT: tl.constexpr,
    ADT: tl.constexpr,
    UPDATE: tl.constexpr,
    MASKED: tl.constexpr,
):
    x = load(x_ptr, offs, inside, MASKED).to(tl.float32)
    if UPDATE:
        before = load(b_ptr, offs, inside, MASKED).to(tl.float32)
        out = before + kept(x - before, a_ptr, scale_ptr, offs, inside, is_shared, ADT, MASKED)
    else:
        out = kept(x, a_ptr, scale_ptr, offs, inside, is_shared, ADT, MASKED)
    store(x_ptr, offs, round_to(out, XDT), inside, MASKED)


@triton.jit
def _soft_mask(
    x_ptrs,
    b_ptrs,
    a_ptrs,
    numels,
    tile_tensor,
    tile_start,
    scale_ptr,
    n_shared,
    XDT: tl.constexpr,
    ADT: tl.constexpr,
    UPDATE: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    t, offs, n, full = tile_of(tile_tensor, tile_start, numels, BLOCK)
    x_ptr = tensor_ptr(x_ptrs, t, XDT, ALIGNED)
    b_ptr = tensor_ptr(b_ptrs, t, XDT, ALIGNED)
    a_ptr = tensor_ptr(a_ptrs, t, ADT, ALIGNED)
    if full:
        _soft_mask_tile(
            x_ptr, b_ptr, a_ptr, scale_ptr, offs, offs < n, t < n_shared, XDT, ADT, UPDATE, False
        )
    else:
        _soft_mask_tile(
            x_ptr, b_ptr, a_ptr, scale_ptr, offs, offs < n, t < n_shared, XDT, ADT, UPDATE, True
        )


def _check(
    op: str, xs: Sequence[Tensor], keeps: Sequence[Tensor], heads: Sequence[Tensor], scale: Tensor
) -> None:
    check_pairs(op, xs, keeps, ("tensors", "keep factors"))
    check_dtypes(op, keeps, KEEP_DTYPES, "keep factor")
    check_dtypes(op, [*xs, *heads], GRAD_DTYPES, "tensor")
    for i, x in enumerate([*xs, *heads]):
        if x.device != scale.device:
            raise ValueError(f"{op}: tensor {i} is on {x.device}, the scale on {scale.device}")
    if scale.numel() != 1 or scale.dtype != torch.float32:
        raise ValueError(
            f"{op}: scale must be a one-element float32 tensor, got {tuple(scale.shape)} "
            f"{scale.dtype}"
        )


def _launch(
    xs: list[Tensor], befores: list[Tensor] | None, keeps: list[Tensor], scale: Tensor
) -> None:
    """One launch over ``xs`` of one dtype (the first ``len(keeps)`` shared, the rest heads)."""
    lists = [xs, keeps] if befores is None else [xs, keeps, befores]
    plan, work = plan_for(lists, scale.device)
    x_ptrs, a_ptrs = plan.pointers[:2]
    _soft_mask[plan.grid](
        x_ptrs,
        plan.pointers[2] if befores is not None else x_ptrs,
        a_ptrs,
        plan.numels,
        plan.tile_tensor,
        plan.tile_start,
        scale,
        len(keeps),
        XDT=TL_DTYPES[work[0][0].dtype],
        ADT=TL_DTYPES[keeps[0].dtype] if keeps else tl.float32,
        UPDATE=befores is not None,
        BLOCK=BLOCK,
        ALIGNED=plan.aligned,
        num_warps=NUM_WARPS,
        # No fused multiply-add: ``before + keep * change`` rounds the product, as the reference.
        enable_fp_fusion=False,
    )
    write_back(xs, work[0])


def _by_dtype(
    xs: Sequence[Tensor],
    befores: Sequence[Tensor] | None,
    keeps: Sequence[Tensor],
    heads: Sequence[Tensor],
    head_befores: Sequence[Tensor] | None,
    scale: Tensor,
) -> None:
    """One launch per (tensor dtype, keep dtype): shared tensors first, then heads."""
    groups: dict[tuple[torch.dtype, torch.dtype], tuple[list, list, list]] = {}
    update = befores is not None
    for i, (x, k) in enumerate(zip(xs, keeps, strict=True)):
        if x.numel():
            entry = groups.setdefault((x.dtype, k.dtype), ([], [], []))
            entry[0].append(x)
            entry[1].append(k)
            entry[2].append(befores[i] if update else None)
    for i, x in enumerate(heads):
        if x.numel():
            key = next((k for k in groups if k[0] == x.dtype), (x.dtype, torch.float32))
            entry = groups.setdefault(key, ([], [], []))
            entry[0].append(x)
            entry[2].append(head_befores[i] if update else None)
    with device_guard(scale.device):
        for group_xs, group_keeps, group_befores in groups.values():
            _launch(group_xs, group_befores if update else None, group_keeps, scale)


def _soft_mask_impl(
    grads: list[Tensor], keeps: list[Tensor], head_grads: list[Tensor], scale: Tensor
) -> None:
    """Triton ``spg_fast.reference.soft_mask_``: ``g *= keep`` per shared pair, ``g *= scale`` per
    head gradient, in place."""
    _check("soft_mask_", grads, keeps, head_grads, scale)
    _by_dtype(grads, None, keeps, head_grads, None, scale)


def _scale_updates_impl(
    params: list[Tensor],
    before: list[Tensor],
    keeps: list[Tensor],
    head_params: list[Tensor],
    head_before: list[Tensor],
    scale: Tensor,
) -> None:
    """Triton ``spg_fast.reference.scale_updates_``: ``p <- before + keep * (p - before)`` per
    shared parameter, ``scale`` for heads, in place; ``before`` is only read."""
    _check("scale_updates_", params, keeps, head_params, scale)
    check_pairs("scale_updates_", params, before, ("parameters", "values before the step"))
    check_pairs("scale_updates_", head_params, head_before, ("heads", "values before the step"))
    _by_dtype(params, before, keeps, head_params, head_before, scale)


soft_mask_ = in_place_op("soft_mask_", _soft_mask_impl, ("grads", "head_grads"))
scale_updates_ = in_place_op("scale_updates_", _scale_updates_impl, ("params", "head_params"))
