"""Fused masked SGD: one pass over each parameter applies SPG's mask (to the gradient or to the
update) and ``torch.optim.SGD``'s update (momentum, dampening, nesterov, weight decay, maximize),
for every parameter of one param group and dtype in one launch (see ``masked_step`` for what the
steps share)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from spg_fast.kernels.triton.custom_ops import device_guard, in_place_op
from spg_fast.kernels.triton.masked_step import (
    kept,
    launch_flags,
    live_tile,
    present,
    split_lr,
    step_grad,
)
from spg_fast.kernels.triton.multi_tensor import LaunchPlan, plan_for, to_device, write_back
from spg_fast.kernels.triton.rounding import round_to
from spg_fast.kernels.triton.tiles import load, store, tensor_ptr


@triton.jit
def _sgd_tile(
    p_ptr,
    g_ptr,
    a_ptr,
    buf_ptr,
    first,
    offs,
    inside,
    is_shared,
    scale_ptr,
    grad_scale_ptr,
    lr,
    weight_decay,
    momentum,
    undamped,
    PDT: tl.constexpr,
    ADT: tl.constexpr,
    HAS_MASK: tl.constexpr,
    UPDATE: tl.constexpr,
    HAS_WD: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    MASKED: tl.constexpr,
):
    g = step_grad(g_ptr, offs, inside, grad_scale_ptr, HAS_GRAD_SCALE, MAXIMIZE, MASKED)
    if HAS_MASK:
        if not UPDATE:
            g = kept(g, a_ptr, scale_ptr, offs, inside, is_shared, ADT, MASKED)
    p = load(p_ptr, offs, inside, MASKED).to(tl.float32)
    if HAS_WD:
        g = g + weight_decay * p
    if HAS_MOMENTUM:
        buf = load(buf_ptr, offs, inside, MASKED).to(tl.float32)
        buf = round_to(tl.where(first, g, buf * momentum + undamped * g), PDT)
        store(buf_ptr, offs, buf, inside, MASKED)
        if NESTEROV:
            g = g + momentum * buf.to(tl.float32)
        else:
            g = buf.to(tl.float32)
    change = lr * g
    if UPDATE:
        change = kept(change, a_ptr, scale_ptr, offs, inside, is_shared, ADT, MASKED)
    store(p_ptr, offs, round_to(p - change, PDT), inside, MASKED)


@triton.jit
def _sgd_step(
    p_ptrs,
    g_ptrs,
    a_ptrs,
    buf_ptrs,
    first_flags,
    numels,
    tile_tensor,
    tile_start,
    scale_ptr,
    n_shared,
    grad_scale_ptr,
    found_inf_ptr,
    lr_ptr,
    lr,
    weight_decay,
    momentum,
    undamped,
    PDT: tl.constexpr,
    ADT: tl.constexpr,
    HAS_MASK: tl.constexpr,
    UPDATE: tl.constexpr,
    HAS_WD: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    LR_TENSOR: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    t, offs, n, full = live_tile(
        tile_tensor, tile_start, numels, found_inf_ptr, HAS_FOUND_INF, BLOCK
    )
    if LR_TENSOR:
        lr = tl.load(lr_ptr).to(tl.float32)
    p_ptr = tensor_ptr(p_ptrs, t, PDT, ALIGNED)
    g_ptr = tensor_ptr(g_ptrs, t, PDT, ALIGNED)
    a_ptr = tensor_ptr(a_ptrs, t, ADT, ALIGNED)
    buf_ptr = tensor_ptr(buf_ptrs, t, PDT, ALIGNED)
    first = tl.load(first_flags + t) != 0
    if full:
        _sgd_tile(
            p_ptr,
            g_ptr,
            a_ptr,
            buf_ptr,
            first,
            offs,
            offs < n,
            t < n_shared,
            scale_ptr,
            grad_scale_ptr,
            lr,
            weight_decay,
            momentum,
            undamped,
            PDT,
            ADT,
            HAS_MASK,
            UPDATE,
            HAS_WD,
            HAS_MOMENTUM,
            NESTEROV,
            MAXIMIZE,
            HAS_GRAD_SCALE,
            False,
        )
    else:
        _sgd_tile(
            p_ptr,
            g_ptr,
            a_ptr,
            buf_ptr,
            first,
            offs,
            offs < n,
            t < n_shared,
            scale_ptr,
            grad_scale_ptr,
            lr,
            weight_decay,
            momentum,
            undamped,
            PDT,
            ADT,
            HAS_MASK,
            UPDATE,
            HAS_WD,
            HAS_MOMENTUM,
            NESTEROV,
            MAXIMIZE,
            HAS_GRAD_SCALE,
            True,
        )


class SGDStep:
    """Masked SGD prepared for fixed ``params`` of one dtype (the first ``len(keeps)`` shared, with
    their stored keep factors ``keeps``; the rest heads) and their ``momentum_buffers`` (empty
    without momentum): the launch plan is built once and each call only points it at that call's
    gradients (``multi_tensor.LaunchPlan.refresh``). Called as ``sgd_step_``, less the fixed
    tensors."""

    def __init__(
        self, params: Sequence[Tensor], keeps: Sequence[Tensor], momentum_buffers: Sequence[Tensor]
    ) -> None:
        self._lists = [list(params), list(params), list(keeps), list(momentum_buffers)]
        self._device = params[0].device if params else None
        self._mutated = [*params, *momentum_buffers]
        # The gradients' table starts out pointing at the parameters; the first call re-points it.
        fits = bool(params) and LaunchPlan.fits(self._lists)
        self._plan = LaunchPlan(self._lists, self._device) if fits else None
        self._first: list[bool] | None = None
        self._first_table: Tensor | None = None

    def __call__(
        self,
        grads: Sequence[Tensor],
        first_step: Sequence[bool],
        scale: Tensor | None,
        update: bool,
        grad_scale: Tensor | None,
        found_inf: Tensor | None,
        lr: float | Tensor,
        weight_decay: float,
        momentum: float,
        dampening: float,
        nesterov: bool,
        maximize: bool,
    ) -> None:
        params, _, keeps, buffers = self._lists
        if not params:
            return
        if torch.compiler.is_compiling():  # the custom op, which compilation traces
            sgd_step_(
                params,
                list(grads),
                keeps,
                buffers,
                list(first_step),
                scale,
                update,
                grad_scale,
                found_inf,
                lr,
                weight_decay,
                momentum,
                dampening,
                nesterov,
                maximize,
            )
            return
        if self._plan is not None and self._plan.refresh(1, grads):
            plan, work = self._plan, self._lists
        else:
            plan, work = plan_for([params, grads, keeps, buffers], self._device)
        if list(first_step) != self._first:
            flags = [int(f) for f in first_step] or [0] * len(params)
            self._first_table = to_device(flags, self._device, torch.int8)
            self._first = list(first_step)
        lr_value, lr_tensor = split_lr(lr, self._device)
        with device_guard(self._device):
            _launch(
                plan,
                work,
                self._first_table,
                scale,
                update,
                grad_scale,
                found_inf,
                lr_value,
                lr_tensor,
                weight_decay,
                momentum,
                dampening,
                nesterov,
                maximize,
            )
        write_back(params, work[0])
        write_back(buffers, work[3])
        torch.autograd.graph.increment_version(self._mutated)


def _launch(
    plan: LaunchPlan,
    work: Sequence[Sequence[Tensor]],
    first: Tensor,
    scale: Tensor | None,
    update: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    lr: float,
    lr_tensor: Tensor | None,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
) -> None:
    device = plan.device
    params, _, keeps, _ = work
    _sgd_step[plan.grid](
        *plan.pointers,
        first,
        plan.numels,
        plan.tile_tensor,
        plan.tile_start,
        *present(device, scale),
        len(keeps),
        *present(device, grad_scale, found_inf, lr_tensor),
        lr,
        weight_decay,
        momentum,
        1.0 - dampening,
        HAS_WD=weight_decay != 0,
        HAS_MOMENTUM=momentum != 0,
        NESTEROV=nesterov,
        MAXIMIZE=maximize,
        **launch_flags(params, keeps, update, scale, grad_scale, found_inf, lr_tensor, plan),
    )


def _sgd_step_impl(
    params: list[Tensor],
    grads: list[Tensor],
    keeps: list[Tensor],
    momentum_buffers: list[Tensor],
    first_step: list[bool],
    scale: Tensor | None,
    update: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    lr: float,
    lr_tensor: Tensor | None,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
) -> None:
    device = params[0].device
    plan, work = plan_for([params, grads, keeps, momentum_buffers], device)
    first = to_device([int(f) for f in first_step] or [0] * len(params), device, torch.int8)
    with device_guard(device):
        _launch(
            plan,
            work,
            first,
            scale,
            update,
            grad_scale,
            found_inf,
            lr,
            lr_tensor,
            weight_decay,
            momentum,
            dampening,
            nesterov,
            maximize,
        )
    write_back(params, work[0])
    write_back(momentum_buffers, work[3])


_sgd_step_call = in_place_op("sgd_step_", _sgd_step_impl, ("params", "momentum_buffers"))


def sgd_step_(
    params: list[Tensor],
    grads: list[Tensor],
    keeps: list[Tensor],
    momentum_buffers: list[Tensor],
    first_step: list[bool],
    scale: Tensor | None,
    update: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    lr: float | Tensor,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
) -> None:
    """Masked SGD over ``params`` of one dtype: the first ``len(keeps)`` are shared (their stored
    keep factors ``keeps``, ``spg_fast.storage``), the rest heads (keep factor ``scale``);
    ``scale`` None means no mask yet. ``update``: mask the update (weight decay and momentum
    included) rather than the gradient. ``momentum_buffers`` (empty without momentum) are set to
    the (masked) gradient where ``first_step`` is True, as torch does. ``.grad`` is read, never
    written."""
    if not params:
        return
    lr_value, lr_tensor = split_lr(lr, params[0].device)
    _sgd_step_call(
        params,
        grads,
        keeps,
        momentum_buffers,
        first_step,
        scale,
        update,
        grad_scale,
        found_inf,
        lr_value,
        lr_tensor,
        weight_decay,
        momentum,
        dampening,
        nesterov,
        maximize,
    )
