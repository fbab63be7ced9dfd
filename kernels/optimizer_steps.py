"""Fused masked optimizer steps: one pass over each parameter applies SPG's mask and the SGD or Adam(W) update.

Each launch covers every parameter of one param group and dtype. Per tensor, the gradient is multiplied by
``1 - A`` (shared) or the head scale (heads), divided by GradScaler's ``grad_scale`` and skipped entirely when its
``found_inf`` is set (both read on the device), then the update of ``torch.optim.SGD`` / ``Adam`` / ``AdamW`` runs in
float32 registers and parameters and state are rounded once to their dtype. Hyperparameters are runtime arguments,
so changing them (an LR schedule) never recompiles. Adam's step counts live on the device, one per tensor, and the
bias corrections are formed from them in float64 inside the kernel: no host synchronisation per step.

Compiled Triton passes Python floats as float32 (its interpreter as float64), so every scalar torch forms in double
is formed on the host and rounded once: ``1 - beta1``, ``1 - beta2``, ``1 - dampening``, ``1 - lr * weight_decay``,
and ``lr`` and ``log(beta)`` as float32 hi/lo pairs for the float64 bias corrections. (Forming ``1 - beta2`` from
float32 0.999 is off by 4.7e-5 relative, which took 50-step Adam trajectories outside float32 agreement with torch
on an H100.) Divisions are IEEE-rounded (``div_rn``), as torch's are.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from spg_fast.kernels.custom_ops import eager_fast_path
from spg_fast.kernels.multi_tensor import (
    BLOCK,
    NUM_WARPS,
    TL_DTYPES,
    LaunchPlan,
    flag_table,
    plan_for,
    write_back,
)
from spg_fast.kernels.rounding import round_to
from spg_fast.kernels.tiles import load, store, tensor_ptr, tile_of


@triton.jit
def _masked_grad(g_ptr, a_ptr, scale_ptr, offs, inside, is_shared, grad_scale_ptr, HAS_MASK: tl.constexpr,
                 HAS_GRAD_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr, MASKED: tl.constexpr):
    """The gradient as torch's optimizer would see it after SPG masking (and GradScaler unscaling), in float32."""
    g = load(g_ptr, offs, inside, MASKED).to(tl.float32)
    if HAS_GRAD_SCALE:
        g = tl.math.div_rn(g, tl.load(grad_scale_ptr))
    if HAS_MASK:
        if is_shared:
            g = g * (1.0 - load(a_ptr, offs, inside, MASKED).to(tl.float32))
        else:
            g = g * tl.load(scale_ptr)
    if MAXIMIZE:
        g = -g
    return g


@triton.jit
def _tile(tile_tensor, tile_start, numels, found_inf_ptr, HAS_FOUND_INF: tl.constexpr, BLOCK: tl.constexpr):
    """This program's tile; no element is live when GradScaler found an inf or NaN this step."""
    t, offs, n, full = tile_of(tile_tensor, tile_start, numels, BLOCK)
    if HAS_FOUND_INF:
        skip = tl.load(found_inf_ptr) != 0.0
        n = tl.where(skip, 0, n)
        full = full & ~skip
    return t, offs, n, full


@triton.jit
def _sgd_tile(p_ptr, g_ptr, a_ptr, buf_ptr, first, offs, inside, is_shared, scale_ptr, grad_scale_ptr, lr,
              weight_decay, momentum, undamped, PDT: tl.constexpr, HAS_MASK: tl.constexpr, HAS_WD: tl.constexpr,
              HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
              HAS_GRAD_SCALE: tl.constexpr, MASKED: tl.constexpr):
    g = _masked_grad(g_ptr, a_ptr, scale_ptr, offs, inside, is_shared, grad_scale_ptr, HAS_MASK, HAS_GRAD_SCALE,
                     MAXIMIZE, MASKED)
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
    store(p_ptr, offs, round_to(p - lr * g, PDT), inside, MASKED)


@triton.jit
def _sgd_step(p_ptrs, g_ptrs, a_ptrs, buf_ptrs, first_flags, numels, tile_tensor, tile_start, scale_ptr, n_shared,
              grad_scale_ptr, found_inf_ptr, lr, weight_decay, momentum, undamped, PDT: tl.constexpr,
              ADT: tl.constexpr, HAS_MASK: tl.constexpr, HAS_WD: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
              NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
              HAS_FOUND_INF: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    t, offs, n, full = _tile(tile_tensor, tile_start, numels, found_inf_ptr, HAS_FOUND_INF, BLOCK)
    p_ptr = tensor_ptr(p_ptrs, t, PDT, ALIGNED)
    g_ptr = tensor_ptr(g_ptrs, t, PDT, ALIGNED)
    a_ptr = tensor_ptr(a_ptrs, t, ADT, ALIGNED)
    buf_ptr = tensor_ptr(buf_ptrs, t, PDT, ALIGNED)
    first = tl.load(first_flags + t) != 0
    if full:
        _sgd_tile(p_ptr, g_ptr, a_ptr, buf_ptr, first, offs, offs < n, t < n_shared, scale_ptr, grad_scale_ptr, lr,
                  weight_decay, momentum, undamped, PDT, HAS_MASK, HAS_WD, HAS_MOMENTUM, NESTEROV, MAXIMIZE,
                  HAS_GRAD_SCALE, False)
    else:
        _sgd_tile(p_ptr, g_ptr, a_ptr, buf_ptr, first, offs, offs < n, t < n_shared, scale_ptr, grad_scale_ptr, lr,
                  weight_decay, momentum, undamped, PDT, HAS_MASK, HAS_WD, HAS_MOMENTUM, NESTEROV, MAXIMIZE,
                  HAS_GRAD_SCALE, True)


@triton.jit
def _adam_tile(p_ptr, g_ptr, a_ptr, m_ptr, v_ptr, vmax_ptr, offs, inside, is_shared, scale_ptr, grad_scale_ptr,
               one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay, step_size, bias2_sqrt,
               PDT: tl.constexpr, HAS_MASK: tl.constexpr,
               HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
               HAS_GRAD_SCALE: tl.constexpr, MASKED: tl.constexpr):
    g = _masked_grad(g_ptr, a_ptr, scale_ptr, offs, inside, is_shared, grad_scale_ptr, HAS_MASK, HAS_GRAD_SCALE,
                     MAXIMIZE, MASKED)
    p = load(p_ptr, offs, inside, MASKED).to(tl.float32)
    if DECOUPLED:
        p = p * decay
    elif HAS_WD:
        g = g + weight_decay * p
    m = load(m_ptr, offs, inside, MASKED).to(tl.float32)
    v = load(v_ptr, offs, inside, MASKED).to(tl.float32)
    m = round_to(m + one_minus_beta1 * (g - m), PDT)
    v = round_to(v * beta2 + one_minus_beta2 * g * g, PDT)
    store(m_ptr, offs, m, inside, MASKED)
    store(v_ptr, offs, v, inside, MASKED)
    v = v.to(tl.float32)
    if AMSGRAD:
        v = tl.maximum(load(vmax_ptr, offs, inside, MASKED).to(tl.float32), v)
        store(vmax_ptr, offs, v.to(PDT), inside, MASKED)
    denom = tl.math.div_rn(tl.sqrt_rn(v), bias2_sqrt) + eps
    store(p_ptr, offs, round_to(p - tl.math.div_rn(step_size * m.to(tl.float32), denom), PDT), inside, MASKED)


@triton.jit
def _adam_step(p_ptrs, g_ptrs, a_ptrs, m_ptrs, v_ptrs, vmax_ptrs, step_ptrs, numels, tile_tensor, tile_start,
               scale_ptr, n_shared, grad_scale_ptr, found_inf_ptr, lr_hi, lr_lo, one_minus_beta1, beta2,
               one_minus_beta2, log_beta1_hi, log_beta1_lo, log_beta2_hi, log_beta2_lo, eps, weight_decay, decay,
               PDT: tl.constexpr, ADT: tl.constexpr, HAS_MASK: tl.constexpr, HAS_WD: tl.constexpr,
               DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
               HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, BLOCK: tl.constexpr,
               ALIGNED: tl.constexpr):
    t, offs, n, full = _tile(tile_tensor, tile_start, numels, found_inf_ptr, HAS_FOUND_INF, BLOCK)
    step = tl.load(tl.load(step_ptrs + t).to(tl.pointer_type(tl.float32))).to(tl.float64)
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
        _adam_tile(p_ptr, g_ptr, a_ptr, m_ptr, v_ptr, vmax_ptr, offs, offs < n, t < n_shared, scale_ptr,
                   grad_scale_ptr, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay, step_size,
                   bias2_sqrt, PDT, HAS_MASK, HAS_WD,
                   DECOUPLED, AMSGRAD, MAXIMIZE, HAS_GRAD_SCALE, False)
    else:
        _adam_tile(p_ptr, g_ptr, a_ptr, m_ptr, v_ptr, vmax_ptr, offs, offs < n, t < n_shared, scale_ptr,
                   grad_scale_ptr, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay, step_size,
                   bias2_sqrt, PDT, HAS_MASK, HAS_WD,
                   DECOUPLED, AMSGRAD, MAXIMIZE, HAS_GRAD_SCALE, True)


def _f32_parts(x: float) -> tuple[float, float]:
    """``x`` as two float32 scalars whose float64 sum is ``x`` to about 48 bits: Triton passes Python floats as
    float32, and the Adam bias corrections are formed in float64 as torch forms them."""
    if not math.isfinite(x):
        return x, 0.0
    hi = float(np.float32(x))
    return hi, x - hi


def _log(beta: float) -> float:
    return math.log(beta) if beta > 0 else -math.inf


@functools.cache
def _dummy(device: torch.device) -> Tensor:
    """Stands in for an absent scalar tensor (its flag tells the kernel not to read it); one per device, so a
    steady-state step allocates nothing."""
    return torch.empty(1, device=device)


def _flags(params: list[Tensor], factors: list[Tensor], scale: Tensor | None, grad_scale: Tensor | None,
           found_inf: Tensor | None, plan: LaunchPlan) -> dict:
    return dict(PDT=TL_DTYPES[params[0].dtype], ADT=TL_DTYPES[factors[0].dtype] if factors else tl.float32,
                HAS_MASK=scale is not None, HAS_GRAD_SCALE=grad_scale is not None,
                HAS_FOUND_INF=found_inf is not None, BLOCK=BLOCK, ALIGNED=plan.aligned, num_warps=NUM_WARPS)


def _scalars(device: torch.device, *tensors: Tensor | None) -> list[Tensor]:
    return [_dummy(device) if t is None else t for t in tensors]


def _sgd_step_impl(params: list[Tensor], grads: list[Tensor], importances: list[Tensor],
              momentum_buffers: list[Tensor], first_step: list[bool], scale: Tensor | None,
              grad_scale: Tensor | None, found_inf: Tensor | None, lr: float, weight_decay: float, momentum: float,
              dampening: float, nesterov: bool, maximize: bool) -> None:
    """Masked SGD over ``params`` of one dtype: the first ``len(importances)`` are shared (mask ``1 - A``), the rest
    heads (mask ``scale``); ``scale`` None means no mask yet. ``momentum_buffers`` (empty without momentum) are
    set to the masked gradient where ``first_step`` is True, as torch does."""
    if not params:
        return
    device = params[0].device
    plan, (work_p, _, work_a, work_b) = plan_for([params, grads, importances, momentum_buffers], device)
    first = flag_table(tuple(first_step) or (False,) * len(params), device)
    _sgd_step[plan.grid](
        *plan.pointers, first, plan.numels, plan.tile_tensor, plan.tile_start, *_scalars(device, scale), len(work_a),
        *_scalars(device, grad_scale, found_inf), lr, weight_decay, momentum, 1.0 - dampening,
        HAS_WD=weight_decay != 0, HAS_MOMENTUM=momentum != 0, NESTEROV=nesterov, MAXIMIZE=maximize,
        **_flags(params, work_a, scale, grad_scale, found_inf, plan))
    write_back(params, work_p)
    write_back(momentum_buffers, work_b)


def _adam_step_impl(params: list[Tensor], grads: list[Tensor], importances: list[Tensor], exp_avgs: list[Tensor],
               exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor], steps: list[Tensor],
               scale: Tensor | None, grad_scale: Tensor | None, found_inf: Tensor | None, lr: float, beta1: float,
               beta2: float, eps: float, weight_decay: float, decoupled: bool, amsgrad: bool,
               maximize: bool) -> None:
    """Masked Adam (``decoupled``: AdamW) over ``params`` of one dtype, shared first then heads as in
    ``sgd_step_``. ``steps`` are float32 device tensors already advanced to this step's count. Scalars that torch
    forms in double (``1 - beta``, ``1 - lr * weight_decay``) are formed here in double too and rounded once."""
    if not params:
        return
    device = params[0].device
    plan, work = plan_for([params, grads, importances, exp_avgs, exp_avg_sqs, max_exp_avg_sqs], device, steps)
    _adam_step[plan.grid](
        *plan.pointers, plan.numels, plan.tile_tensor, plan.tile_start, *_scalars(device, scale), len(work[2]),
        *_scalars(device, grad_scale, found_inf), *_f32_parts(lr), 1.0 - beta1, beta2, 1.0 - beta2,
        *_f32_parts(_log(beta1)), *_f32_parts(_log(beta2)), eps, weight_decay, 1.0 - lr * weight_decay,
        HAS_WD=weight_decay != 0, DECOUPLED=decoupled, AMSGRAD=amsgrad, MAXIMIZE=maximize,
        **_flags(params, work[2], scale, grad_scale, found_inf, plan))
    for originals, w in zip((params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs), (work[0], *work[3:]), strict=True):
        write_back(originals, w)


_SGD_MUTATES = ("params", "momentum_buffers")
_ADAM_MUTATES = ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")
_sgd_step_op = torch.library.custom_op("spg_fast::sgd_step_", mutates_args=_SGD_MUTATES)(_sgd_step_impl)
_adam_step_op = torch.library.custom_op("spg_fast::adam_step_", mutates_args=_ADAM_MUTATES)(_adam_step_impl)


@_sgd_step_op.register_fake
def _(*args: object, **kwargs: object) -> None:
    return None


@_adam_step_op.register_fake
def _(*args: object, **kwargs: object) -> None:
    return None


sgd_step_ = eager_fast_path(_sgd_step_op, _sgd_step_impl, _SGD_MUTATES)
adam_step_ = eager_fast_path(_adam_step_op, _adam_step_impl, _ADAM_MUTATES)
