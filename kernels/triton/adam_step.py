"""Fused masked Adam / AdamW: one pass over each parameter applies SPG's mask (to the gradient or
to the update) and ``torch.optim.Adam``'s update (amsgrad, coupled or decoupled weight decay,
maximize), for every parameter of one param group and dtype in one launch (see ``masked_step`` for
what the steps share).
Step counts live on the device, one per tensor, and the bias corrections are formed from them in
float64 inside the kernel, as torch forms them: no host synchronisation. The counts are advanced by
a second, tiny launch over the same pointer table (in place of torch's ``_foreach_add_``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from spg_fast.kernels.triton.custom_ops import device_guard, in_place_op
from spg_fast.kernels.triton.masked_step import (
    f32_parts,
    kept,
    launch_flags,
    live_tile,
    present,
    split_lr,
    step_grad,
)
from spg_fast.kernels.triton.multi_tensor import BLOCK, LaunchPlan, plan_for, write_back
from spg_fast.kernels.triton.rounding import round_to
from spg_fast.kernels.triton.tiles import load, store, tensor_ptr


@triton.jit
def _adam_tile(
    p_ptr,
    g_ptr,
    a_ptr,
    m_ptr,
    v_ptr,
    vmax_ptr,
    offs,
    inside,
    is_shared,
    scale_ptr,
    grad_scale_ptr,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    weight_decay,
    decay,
    lr_wd,
    step_size,
    bias2_sqrt,
    PDT: tl.constexpr,
    ADT: tl.constexpr,
    HAS_MASK: tl.constexpr,
    UPDATE: tl.constexpr,
    HAS_WD: tl.constexpr,
    DECOUPLED: tl.constexpr,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    MASKED: tl.constexpr,
):
    g = step_grad(g_ptr, offs, inside, grad_scale_ptr, HAS_GRAD_SCALE, MAXIMIZE, MASKED)
    if HAS_MASK:
        if not UPDATE:
            g = kept(g, a_ptr, scale_ptr, offs, inside, is_shared, ADT, MASKED)
    p = load(p_ptr, offs, inside, MASKED).to(tl.float32)
    if not DECOUPLED:
        if HAS_WD:
            g = g + weight_decay * p
    m = load(m_ptr, offs, inside, MASKED).to(tl.float32)
    v = load(v_ptr, offs, inside, MASKED).to(tl.float32)
    # torch's lerp: exact at either end of the weight range (beta1 = 0 gives m = g exactly).
    m = round_to(
        tl.where(
            one_minus_beta1 < 0.5,
            m + one_minus_beta1 * (g - m),
            g - (g - m) * (1.0 - one_minus_beta1),
        ),
        PDT,
    )
    v = round_to(v * beta2 + one_minus_beta2 * g * g, PDT)
    store(m_ptr, offs, m, inside, MASKED)
    store(v_ptr, offs, v, inside, MASKED)
    v = v.to(tl.float32)
    if AMSGRAD:
        v = tl.maximum(load(vmax_ptr, offs, inside, MASKED).to(tl.float32), v)
        store(vmax_ptr, offs, v.to(PDT), inside, MASKED)
    denom = tl.math.div_rn(tl.sqrt_rn(v), bias2_sqrt) + eps
    step = tl.math.div_rn(step_size * m.to(tl.float32), denom)
    if UPDATE:
        # The change torch's step makes, weight decay included, scaled by the keep factor.
        change = step
        if DECOUPLED:
            change = change + lr_wd * p
        p = p - kept(change, a_ptr, scale_ptr, offs, inside, is_shared, ADT, MASKED)
    else:
        if DECOUPLED:
            p = p * decay
        p = p - step
    store(p_ptr, offs, round_to(p, PDT), inside, MASKED)


@triton.jit
def _adam_step(
    p_ptrs,
    g_ptrs,
    a_ptrs,
    m_ptrs,
    v_ptrs,
    vmax_ptrs,
    step_ptrs,
    numels,
    tile_tensor,
    tile_start,
    scale_ptr,
    n_shared,
    grad_scale_ptr,
    found_inf_ptr,
    lr_ptr,
    lr_hi,
    lr_lo,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    log_beta1_hi,
    log_beta1_lo,
    log_beta2_hi,
    log_beta2_lo,
    eps,
    weight_decay,
    decay,
    lr_wd,
    PDT: tl.constexpr,
    ADT: tl.constexpr,
    HAS_MASK: tl.constexpr,
    UPDATE: tl.constexpr,
    HAS_WD: tl.constexpr,
    DECOUPLED: tl.constexpr,
    AMSGRAD: tl.constexpr,
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
    # This step's count: the stored one plus one (``_advance_steps`` stores it after this launch).
    step = tl.load(tl.load(step_ptrs + t).to(tl.pointer_type(tl.float32))).to(tl.float64) + 1.0
    if LR_TENSOR:
        lr = tl.load(lr_ptr).to(tl.float64)
        decay = (1.0 - lr * weight_decay).to(tl.float32)
        lr_wd = (lr * weight_decay).to(tl.float32)
    else:
        lr = tl.cast(lr_hi, tl.float64) + tl.cast(lr_lo, tl.float64)
    log_beta1 = tl.cast(log_beta1_hi, tl.float64) + tl.cast(log_beta1_lo, tl.float64)
    log_beta2 = tl.cast(log_beta2_hi, tl.float64) + tl.cast(log_beta2_lo, tl.float64)
    step_size = (lr / (1.0 - tl.exp(step * log_beta1))).to(tl.float32)
    bias2_sqrt = tl.sqrt(1.0 - tl.exp(step * log_beta2)).to(tl.float32)
    p_ptr = tensor_ptr(p_ptrs, t, PDT, ALIGNED)
    g_ptr = tensor_ptr(g_ptrs, t, PDT, ALIGNED)
    a_ptr = tensor_ptr(a_ptrs, t, ADT, ALIGNED)
    m_ptr = tensor_ptr(m_ptrs, t, PDT, ALIGNED)
    v_ptr = tensor_ptr(v_ptrs, t, PDT, ALIGNED)
    vmax_ptr = tensor_ptr(vmax_ptrs, t, PDT, ALIGNED)
    if full:
        _adam_tile(
            p_ptr,
            g_ptr,
            a_ptr,
            m_ptr,
            v_ptr,
            vmax_ptr,
            offs,
            offs < n,
            t < n_shared,
            scale_ptr,
            grad_scale_ptr,
            one_minus_beta1,
            beta2,
            one_minus_beta2,
            eps,
            weight_decay,
            decay,
            lr_wd,
            step_size,
            bias2_sqrt,
            PDT,
            ADT,
            HAS_MASK,
            UPDATE,
            HAS_WD,
            DECOUPLED,
            AMSGRAD,
            MAXIMIZE,
            HAS_GRAD_SCALE,
            False,
        )
    else:
        _adam_tile(
            p_ptr,
            g_ptr,
            a_ptr,
            m_ptr,
            v_ptr,
            vmax_ptr,
            offs,
            offs < n,
            t < n_shared,
            scale_ptr,
            grad_scale_ptr,
            one_minus_beta1,
            beta2,
            one_minus_beta2,
            eps,
            weight_decay,
            decay,
            lr_wd,
            step_size,
            bias2_sqrt,
            PDT,
            ADT,
            HAS_MASK,
            UPDATE,
            HAS_WD,
            DECOUPLED,
            AMSGRAD,
            MAXIMIZE,
            HAS_GRAD_SCALE,
            True,
        )


@triton.jit
def _advance_steps(step_ptrs, n, found_inf_ptr, HAS_FOUND_INF: tl.constexpr, BLOCK: tl.constexpr):
    """``step += 1`` for every tensor's step count (``+= 1 - found_inf`` under GradScaler), as torch
    advances them."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = i < n
    ptrs = tl.load(step_ptrs + i, mask=live, other=0).to(tl.pointer_type(tl.float32))
    increment = 1.0
    if HAS_FOUND_INF:
        increment = 1.0 - tl.load(found_inf_ptr)
    tl.store(ptrs, tl.load(ptrs, mask=live, other=0.0) + increment, mask=live)


def _log(beta: float) -> float:
    return math.log(beta) if beta > 0 else -math.inf


class AdamStep:
    """Masked Adam prepared for fixed ``params`` of one dtype (shared first, with their stored keep
    factors ``keeps``, then heads), their state (``max_exp_avg_sqs`` empty without amsgrad) and
    float32 device step counts: the launch plan is built once and each call only points it at that
    call's gradients. Called as ``adam_step_``, less the fixed tensors."""

    def __init__(
        self,
        params: Sequence[Tensor],
        keeps: Sequence[Tensor],
        exp_avgs: Sequence[Tensor],
        exp_avg_sqs: Sequence[Tensor],
        max_exp_avg_sqs: Sequence[Tensor],
        steps: Sequence[Tensor],
    ) -> None:
        self._lists = [
            list(t) for t in (params, params, keeps, exp_avgs, exp_avg_sqs, max_exp_avg_sqs)
        ]
        self._steps = list(steps)
        self._mutated = [t for lst in (self._lists[0], *self._lists[3:]) for t in lst]
        self._device = params[0].device if params else None
        fits = bool(params) and LaunchPlan.fits(self._lists)
        self._plan = LaunchPlan(self._lists, self._device, self._steps) if fits else None

    def __call__(
        self,
        grads: Sequence[Tensor],
        scale: Tensor | None,
        update: bool,
        grad_scale: Tensor | None,
        found_inf: Tensor | None,
        lr: float | Tensor,
        beta1: float,
        beta2: float,
        eps: float,
        weight_decay: float,
        decoupled: bool,
        amsgrad: bool,
        maximize: bool,
    ) -> None:
        params = self._lists[0]
        if not params:
            return
        if torch.compiler.is_compiling():  # the custom op, which compilation traces
            adam_step_(
                params,
                list(grads),
                *self._lists[2:],
                self._steps,
                scale,
                update,
                grad_scale,
                found_inf,
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
                decoupled,
                amsgrad,
                maximize,
            )
            return
        if self._plan is not None and self._plan.refresh(1, grads):
            plan, work = self._plan, self._lists
        else:
            lists = [params, grads, *self._lists[2:]]
            plan, work = plan_for(lists, self._device, self._steps)
        lr_value, lr_tensor = split_lr(lr, self._device)
        with device_guard(self._device):
            _launch(
                plan,
                work,
                len(self._steps),
                scale,
                update,
                grad_scale,
                found_inf,
                lr_value,
                lr_tensor,
                beta1,
                beta2,
                eps,
                weight_decay,
                decoupled,
                amsgrad,
                maximize,
            )
        for originals, w in zip((params, *self._lists[3:]), (work[0], *work[3:]), strict=True):
            write_back(originals, w)
        torch.autograd.graph.increment_version(self._mutated)


def _launch(
    plan: LaunchPlan,
    work: Sequence[Sequence[Tensor]],
    n_steps: int,
    scale: Tensor | None,
    update: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    lr: float,
    lr_tensor: Tensor | None,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    amsgrad: bool,
    maximize: bool,
) -> None:
    """The update launch, then the launch that advances the step counts (the last pointer table)."""
    device = plan.device
    params, keeps = work[0], work[2]
    _adam_step[plan.grid](
        *plan.pointers,
        plan.numels,
        plan.tile_tensor,
        plan.tile_start,
        *present(device, scale),
        len(keeps),
        *present(device, grad_scale, found_inf, lr_tensor),
        *f32_parts(lr),
        1.0 - beta1,
        beta2,
        1.0 - beta2,
        *f32_parts(_log(beta1)),
        *f32_parts(_log(beta2)),
        eps,
        weight_decay,
        1.0 - lr * weight_decay,
        lr * weight_decay,
        HAS_WD=weight_decay != 0,
        DECOUPLED=decoupled,
        AMSGRAD=amsgrad,
        MAXIMIZE=maximize,
        **launch_flags(params, keeps, update, scale, grad_scale, found_inf, lr_tensor, plan),
    )
    _advance_steps[(triton.cdiv(n_steps, BLOCK),)](
        plan.pointers[-1],
        n_steps,
        *present(device, found_inf),
        HAS_FOUND_INF=found_inf is not None,
        BLOCK=BLOCK,
    )


def _adam_step_impl(
    params: list[Tensor],
    grads: list[Tensor],
    keeps: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    scale: Tensor | None,
    update: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    lr: float,
    lr_tensor: Tensor | None,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    amsgrad: bool,
    maximize: bool,
) -> None:
    device = params[0].device
    lists = [params, grads, keeps, exp_avgs, exp_avg_sqs, max_exp_avg_sqs]
    plan, work = plan_for(lists, device, steps)
    with device_guard(device):
        _launch(
            plan,
            work,
            len(steps),
            scale,
            update,
            grad_scale,
            found_inf,
            lr,
            lr_tensor,
            beta1,
            beta2,
            eps,
            weight_decay,
            decoupled,
            amsgrad,
            maximize,
        )
    for originals, w in zip(
        (params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs), (work[0], *work[3:]), strict=True
    ):
        write_back(originals, w)


_adam_step_call = in_place_op(
    "adam_step_", _adam_step_impl, ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps")
)


def adam_step_(
    params: list[Tensor],
    grads: list[Tensor],
    keeps: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    scale: Tensor | None,
    update: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    amsgrad: bool,
    maximize: bool,
) -> None:
    """Masked Adam (``decoupled``: AdamW) over ``params`` of one dtype, shared first then heads,
    keep factors and ``update`` as in ``sgd_step_``. ``steps`` are the float32 device step counts
    before this step; this call advances them (by ``1 - found_inf`` under GradScaler) in a second,
    tiny launch after the update. ``max_exp_avg_sqs`` is empty without amsgrad. ``.grad`` is read,
    never written."""
    if not params:
        return
    lr_value, lr_tensor = split_lr(lr, params[0].device)
    _adam_step_call(
        params,
        grads,
        keeps,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        steps,
        scale,
        update,
        grad_scale,
        found_inf,
        lr_value,
        lr_tensor,
        beta1,
        beta2,
        eps,
        weight_decay,
        decoupled,
        amsgrad,
        maximize,
    )
