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
from spg_fast.kernels.triton.multi_tensor import (
    BLOCK,
    NUM_WARPS,
    TL_DTYPES,
    LaunchPlan,
    plan_for,
    write_back,
)
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


class _Group:
    """The tensors of one (dtype, keep dtype) of a ``SoftMask``: their positions among the targets
    (shared, then heads), how many are shared, and the launch plan once built."""

    def __init__(self, dtype: torch.dtype, keep_dtype: torch.dtype) -> None:
        self.xdt, self.adt = TL_DTYPES[dtype], TL_DTYPES[keep_dtype]
        self.shared: list[int] = []
        self.heads: list[int] = []
        self.keeps: list[Tensor] = []
        self.plan: LaunchPlan | None = None

    @property
    def positions(self) -> list[int]:
        return self.shared + self.heads


class SoftMask:
    """SPG's mask prepared for fixed tensors: the targets (``xs`` shared, their stored keep factors
    ``keeps``, then ``heads``), one launch per (dtype, keep dtype), each plan built once.

    Without ``before`` it masks gradients, ``g *= keep``: call it with each step's gradients of the
    targets, laid out as the targets (the plan is re-pointed at them). With ``before`` (values
    before a step, one buffer per target, kept where they are) it masks the change a step made,
    ``p = before + keep * (p - before)``: call it with no gradients. ``scale`` is the head scale."""

    def __init__(
        self,
        xs: Sequence[Tensor],
        keeps: Sequence[Tensor],
        heads: Sequence[Tensor],
        before: Sequence[Tensor] | None = None,
        head_before: Sequence[Tensor] | None = None,
    ) -> None:
        self._targets = [*xs, *heads]
        self._before = None if before is None else [*before, *head_before]
        groups: dict[tuple[torch.dtype, torch.dtype], _Group] = {}
        for i, (x, k) in enumerate(zip(xs, keeps, strict=True)):
            if x.numel():
                group = groups.setdefault((x.dtype, k.dtype), _Group(x.dtype, k.dtype))
                group.shared.append(i)
                group.keeps.append(k)
        for i, x in enumerate(heads, start=len(xs)):
            if x.numel():
                key = next((k for k in groups if k[0] == x.dtype), (x.dtype, torch.float32))
                groups.setdefault(key, _Group(*key)).heads.append(i)
        self._groups = list(groups.values())
        for group in self._groups:
            lists = self._lists(group, self._targets)
            if LaunchPlan.fits(lists):
                group.plan = LaunchPlan(lists, lists[0][0].device)

    def _lists(self, group: _Group, targets: Sequence[Tensor]) -> list[list[Tensor]]:
        xs = [targets[i] for i in group.positions]
        if self._before is None:
            return [xs, group.keeps]
        return [xs, group.keeps, [self._before[i] for i in group.positions]]

    def __call__(
        self, grads: Sequence[Tensor] | None, head_grads: Sequence[Tensor] | None, scale: Tensor
    ) -> None:
        targets = self._targets if grads is None else [*grads, *head_grads]
        if len(targets) != len(self._targets):
            raise ValueError(
                f"soft mask: prepared for {len(self._targets)} tensors, called with {len(targets)}"
            )
        with device_guard(scale.device):
            for group in self._groups:
                xs = [targets[i] for i in group.positions]
                if group.plan is not None and (grads is None or group.plan.refresh(0, xs)):
                    plan, work = group.plan, None
                else:
                    plan, work = plan_for(self._lists(group, targets), scale.device)
                _launch(plan, group, scale, self._before is not None)
                if work is not None:
                    write_back(xs, work[0])


def _launch(plan: LaunchPlan, group: _Group, scale: Tensor, update: bool) -> None:
    """One launch over a group's targets (the first ``len(group.shared)`` shared, then heads)."""
    x_ptrs, a_ptrs = plan.pointers[:2]
    _soft_mask[plan.grid](
        x_ptrs,
        plan.pointers[2] if update else x_ptrs,
        a_ptrs,
        plan.numels,
        plan.tile_tensor,
        plan.tile_start,
        scale,
        len(group.shared),
        XDT=group.xdt,
        ADT=group.adt,
        UPDATE=update,
        BLOCK=BLOCK,
        ALIGNED=plan.aligned,
        num_warps=NUM_WARPS,
        # No fused multiply-add: ``before + keep * change`` rounds the product, as the reference.
        enable_fp_fusion=False,
    )


def _soft_mask_impl(
    grads: list[Tensor], keeps: list[Tensor], head_grads: list[Tensor], scale: Tensor
) -> None:
    """Triton ``spg_fast.reference.soft_mask_``: ``g *= keep`` per shared pair, ``g *= scale`` per
    head gradient, in place."""
    _check("soft_mask_", grads, keeps, head_grads, scale)
    SoftMask(grads, keeps, head_grads)(None, None, scale)


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
    SoftMask(params, keeps, head_params, before, head_before)(None, None, scale)


soft_mask_ = in_place_op("soft_mask_", _soft_mask_impl, ("grads", "head_grads"))
scale_updates_ = in_place_op("scale_updates_", _scale_updates_impl, ("params", "head_params"))
