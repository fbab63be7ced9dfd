"""Fused masked optimizer steps: one pass over each parameter applies SPG's mask and the SGD or Adam(W) update.

Each launch covers every parameter of one param group and dtype. Per tensor, the gradient is multiplied by
``1 - A`` (shared) or the head scale (heads), divided by GradScaler's ``grad_scale`` and skipped entirely when its
``found_inf`` is set (both read on the device), then the update of ``torch.optim.SGD`` / ``Adam`` / ``AdamW`` runs in
float32 registers and parameters and state are rounded once to their dtype. Hyperparameters are runtime arguments,
so changing them (an LR schedule) never recompiles. Adam's step counts live on the device, one per tensor, and the
bias corrections are formed from them in float64 inside the kernel: no host synchronisation per step.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from spg_fast.kernels.multi_tensor import (
    BLOCK,
    NUM_WARPS,
    TL_DTYPES,
    aligned,
    dense,
    dense_like,
    pointer_table,
    tile_table,
    to_device,
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
        g = g / tl.load(grad_scale_ptr)
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
              weight_decay, momentum, dampening, PDT: tl.constexpr, HAS_MASK: tl.constexpr, HAS_WD: tl.constexpr,
              HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
              HAS_GRAD_SCALE: tl.constexpr, MASKED: tl.constexpr):
    g = _masked_grad(g_ptr, a_ptr, scale_ptr, offs, inside, is_shared, grad_scale_ptr, HAS_MASK, HAS_GRAD_SCALE,
                     MAXIMIZE, MASKED)
    p = load(p_ptr, offs, inside, MASKED).to(tl.float32)
    if HAS_WD:
        g = g + weight_decay * p
    if HAS_MOMENTUM:
        buf = load(buf_ptr, offs, inside, MASKED).to(tl.float32)
        buf = round_to(tl.where(first, g, buf * momentum + (1.0 - dampening) * g), PDT)
        store(buf_ptr, offs, buf, inside, MASKED)
        if NESTEROV:
            g = g + momentum * buf.to(tl.float32)
        else:
            g = buf.to(tl.float32)
    store(p_ptr, offs, round_to(p - lr * g, PDT), inside, MASKED)


@triton.jit
def _sgd_step(p_ptrs, g_ptrs, a_ptrs, buf_ptrs, first_flags, numels, tile_tensor, tile_start, scale_ptr, n_shared,
              grad_scale_ptr, found_inf_ptr, lr, weight_decay, momentum, dampening, PDT: tl.constexpr,
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
                  weight_decay, momentum, dampening, PDT, HAS_MASK, HAS_WD, HAS_MOMENTUM, NESTEROV, MAXIMIZE,
                  HAS_GRAD_SCALE, False)
    else:
        _sgd_tile(p_ptr, g_ptr, a_ptr, buf_ptr, first, offs, offs < n, t < n_shared, scale_ptr, grad_scale_ptr, lr,
                  weight_decay, momentum, dampening, PDT, HAS_MASK, HAS_WD, HAS_MOMENTUM, NESTEROV, MAXIMIZE,
                  HAS_GRAD_SCALE, True)


@triton.jit
def _adam_tile(p_ptr, g_ptr, a_ptr, m_ptr, v_ptr, vmax_ptr, offs, inside, is_shared, scale_ptr, grad_scale_ptr,
               lr, beta1, beta2, eps, weight_decay, step_size, bias2_sqrt, PDT: tl.constexpr, HAS_MASK: tl.constexpr,
               HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
               HAS_GRAD_SCALE: tl.constexpr, MASKED: tl.constexpr):
    g = _masked_grad(g_ptr, a_ptr, scale_ptr, offs, inside, is_shared, grad_scale_ptr, HAS_MASK, HAS_GRAD_SCALE,
                     MAXIMIZE, MASKED)
    p = load(p_ptr, offs, inside, MASKED).to(tl.float32)
    if DECOUPLED:
        p = p * (1.0 - lr * weight_decay)
    elif HAS_WD:
        g = g + weight_decay * p
    m = load(m_ptr, offs, inside, MASKED).to(tl.float32)
    v = load(v_ptr, offs, inside, MASKED).to(tl.float32)
    m = round_to(m + (1.0 - beta1) * (g - m), PDT)
    v = round_to(v * beta2 + (1.0 - beta2) * g * g, PDT)
    store(m_ptr, offs, m, inside, MASKED)
    store(v_ptr, offs, v, inside, MASKED)
    v = v.to(tl.float32)
    if AMSGRAD:
        v = tl.maximum(load(vmax_ptr, offs, inside, MASKED).to(tl.float32), v)
        store(vmax_ptr, offs, v.to(PDT), inside, MASKED)
    denom = tl.sqrt_rn(v) / bias2_sqrt + eps
    store(p_ptr, offs, round_to(p - step_size * m.to(tl.float32) / denom, PDT), inside, MASKED)


@triton.jit
def _adam_step(p_ptrs, g_ptrs, a_ptrs, m_ptrs, v_ptrs, vmax_ptrs, step_ptrs, numels, tile_tensor, tile_start,
               scale_ptr, n_shared, grad_scale_ptr, found_inf_ptr, lr, beta1, beta2, log_beta1, log_beta2, eps,
               weight_decay, PDT: tl.constexpr, ADT: tl.constexpr, HAS_MASK: tl.constexpr, HAS_WD: tl.constexpr,
               DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
               HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, BLOCK: tl.constexpr,
               ALIGNED: tl.constexpr):
    t, offs, n, full = _tile(tile_tensor, tile_start, numels, found_inf_ptr, HAS_FOUND_INF, BLOCK)
    step = tl.load(tl.load(step_ptrs + t).to(tl.pointer_type(tl.float32))).to(tl.float64)
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
                   grad_scale_ptr, lr, beta1, beta2, eps, weight_decay, step_size, bias2_sqrt, PDT, HAS_MASK, HAS_WD,
                   DECOUPLED, AMSGRAD, MAXIMIZE, HAS_GRAD_SCALE, False)
    else:
        _adam_tile(p_ptr, g_ptr, a_ptr, m_ptr, v_ptr, vmax_ptr, offs, offs < n, t < n_shared, scale_ptr,
                   grad_scale_ptr, lr, beta1, beta2, eps, weight_decay, step_size, bias2_sqrt, PDT, HAS_MASK, HAS_WD,
                   DECOUPLED, AMSGRAD, MAXIMIZE, HAS_GRAD_SCALE, True)


def _tables(device: torch.device, length: int, *lists: list[Tensor | None]) -> list[Tensor]:
    return [pointer_table(tensors, device, length) for tensors in lists]


def _scalar_or_dummy(t: Tensor | None, device: torch.device) -> Tensor:
    return t if t is not None else torch.empty(1, device=device)


def _common(params: list[Tensor], grads: list[Tensor], factors: list[Tensor] | None, scale: Tensor | None,
            grad_scale: Tensor | None, found_inf: Tensor | None):
    """Dense working copies, tile tables and the flags shared by both steps (params: shared first, then heads)."""
    device = params[0].device
    work_p = [dense(p) for p in params]
    work_g = [dense_like(g, p) for g, p in zip(grads, work_p, strict=True)]
    work_a = [dense_like(a, p) for a, p in zip(factors or [], work_p, strict=False)]
    tile_tensor, tile_start, numels = tile_table(work_p, device)
    args = dict(
        tables=(tile_tensor, tile_start, numels),
        scale=_scalar_or_dummy(scale, device),
        grad_scale=_scalar_or_dummy(grad_scale, device),
        found_inf=_scalar_or_dummy(found_inf, device),
        flags=dict(PDT=TL_DTYPES[params[0].dtype], ADT=TL_DTYPES[work_a[0].dtype] if work_a else tl.float32,
                   HAS_MASK=scale is not None, HAS_GRAD_SCALE=grad_scale is not None,
                   HAS_FOUND_INF=found_inf is not None, BLOCK=BLOCK,
                   ALIGNED=aligned(work_p + work_g + work_a), num_warps=NUM_WARPS),
    )
    return device, work_p, work_g, work_a, args


@torch.library.custom_op("spg_fast::sgd_step_", mutates_args=("params", "momentum_buffers"))
def sgd_step_(params: list[Tensor], grads: list[Tensor], importances: list[Tensor],
              momentum_buffers: list[Tensor], first_step: list[bool], scale: Tensor | None,
              grad_scale: Tensor | None, found_inf: Tensor | None, lr: float, weight_decay: float, momentum: float,
              dampening: float, nesterov: bool, maximize: bool) -> None:
    """Masked SGD over ``params`` of one dtype: the first ``len(importances)`` are shared (mask ``1 - A``), the rest
    heads (mask ``scale``); ``scale`` None means no mask yet. ``momentum_buffers`` (empty without momentum) are
    set to the masked gradient where ``first_step`` is True, as torch does."""
    if not params:
        return
    device, work_p, work_g, work_a, args = _common(params, grads, importances, scale, grad_scale, found_inf)
    work_b = [dense_like(b, p) for b, p in zip(momentum_buffers, work_p, strict=False)]
    p_t, g_t, a_t, b_t = _tables(device, len(params), work_p, work_g, work_a, work_b)
    first = to_device([int(f) for f in first_step] or [0] * len(params), torch.int8, device)
    tile_tensor, tile_start, numels = args["tables"]
    _sgd_step[(tile_tensor.numel(),)](
        p_t, g_t, a_t, b_t, first, numels, tile_tensor, tile_start, args["scale"], len(work_a),
        args["grad_scale"], args["found_inf"], lr, weight_decay, momentum, dampening, HAS_WD=weight_decay != 0,
        HAS_MOMENTUM=momentum != 0, NESTEROV=nesterov, MAXIMIZE=maximize, **args["flags"])
    write_back(params, work_p)
    write_back(momentum_buffers, work_b)


@torch.library.custom_op("spg_fast::adam_step_",
                         mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"))
def adam_step_(params: list[Tensor], grads: list[Tensor], importances: list[Tensor], exp_avgs: list[Tensor],
               exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor], steps: list[Tensor],
               scale: Tensor | None, grad_scale: Tensor | None, found_inf: Tensor | None, lr: float, beta1: float,
               beta2: float, eps: float, weight_decay: float, decoupled: bool, amsgrad: bool,
               maximize: bool) -> None:
    """Masked Adam (``decoupled``: AdamW) over ``params`` of one dtype, shared first then heads as in
    ``sgd_step_``. ``steps`` are float32 device tensors already advanced to this step's count."""
    if not params:
        return
    device, work_p, work_g, work_a, args = _common(params, grads, importances, scale, grad_scale, found_inf)
    work_m = [dense_like(m, p) for m, p in zip(exp_avgs, work_p, strict=True)]
    work_v = [dense_like(v, p) for v, p in zip(exp_avg_sqs, work_p, strict=True)]
    work_vmax = [dense_like(v, p) for v, p in zip(max_exp_avg_sqs, work_p, strict=False)]
    tables = _tables(device, len(params), work_p, work_g, work_a, work_m, work_v, work_vmax, list(steps))
    tile_tensor, tile_start, numels = args["tables"]
    _adam_step[(tile_tensor.numel(),)](
        *tables, numels, tile_tensor, tile_start, args["scale"], len(work_a), args["grad_scale"],
        args["found_inf"], lr, beta1, beta2, math.log(beta1) if beta1 > 0 else -math.inf, math.log(beta2), eps,
        weight_decay, HAS_WD=weight_decay != 0, DECOUPLED=decoupled, AMSGRAD=amsgrad, MAXIMIZE=maximize,
        **args["flags"])
    for originals, work in ((params, work_p), (exp_avgs, work_m), (exp_avg_sqs, work_v),
                            (max_exp_avg_sqs, work_vmax)):
        write_back(originals, work)


@sgd_step_.register_fake
def _(*args: object, **kwargs: object) -> None:
    return None


@adam_step_.register_fake
def _(*args: object, **kwargs: object) -> None:
    return None
