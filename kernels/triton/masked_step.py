"""What the fused masked optimizer steps (``sgd_step``, ``adam_step``) share: the gradient, the
keep factor and the live tile in Triton, and the host-side scalars and flags of a launch.

Each launch covers every parameter of one param group and dtype. Per tensor, the gradient is
divided by GradScaler's ``grad_scale`` and the step skipped entirely when its ``found_inf`` is set
(both read on the device); the keep factor is the stored one of a shared tensor (decoded in
registers, ``keep_codec``) or the head scale of a head. With ``UPDATE`` false (gradient masking,
the paper's rule) the gradient is multiplied by it before the optimizer's update; with ``UPDATE``
true (update masking) the optimizer's update runs on the unmasked gradient and the change it makes
to the parameter, weight decay included, is multiplied by it. The update runs in float32 registers
and parameters and state are rounded once to their dtype. Hyperparameters are runtime arguments,
so changing them (an LR schedule) never recompiles the kernel; ``lr`` may also be a tensor on the
parameters' device, read by the kernel, so a step captured in a CUDA graph or compiled by
``torch.compile`` follows a scheduler that changes it in place.

Compiled Triton passes Python floats as float32 (its interpreter as float64), so every scalar torch
forms in double is formed on the host and rounded once (``1 - beta``, ``1 - dampening``,
``1 - lr * weight_decay``), and scalars that must stay float64 go as float32 hi/lo pairs. (Forming
``1 - beta2`` from float32 0.999 is off by 4.7e-5 relative, which took 50-step Adam trajectories
outside float32 agreement with torch on an H100.)
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from spg_fast.kernels.triton.keep_codec import decode
from spg_fast.kernels.triton.multi_tensor import BLOCK, NUM_WARPS, TL_DTYPES, LaunchPlan
from spg_fast.kernels.triton.tiles import load, tile_of


@triton.jit
def step_grad(
    g_ptr,
    offs,
    inside,
    grad_scale_ptr,
    HAS_GRAD_SCALE: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    MASKED: tl.constexpr,
):
    """The gradient as torch's optimizer sees it (GradScaler's scale divided out, negated to
    maximize), in float32, before any mask."""
    g = load(g_ptr, offs, inside, MASKED).to(tl.float32)
    if HAS_GRAD_SCALE:
        g = tl.math.div_rn(g, tl.load(grad_scale_ptr))
    if MAXIMIZE:
        g = -g
    return g


@triton.jit
def kept(x, a_ptr, scale_ptr, offs, inside, is_shared, ADT: tl.constexpr, MASKED: tl.constexpr):
    """``x`` times SPG's keep factor: the stored one of a shared tensor (``ADT``, decoded in
    registers), the head scale of a head."""
    if is_shared:
        x = x * decode(load(a_ptr, offs, inside, MASKED), ADT)
    else:
        x = x * tl.load(scale_ptr)
    return x


@triton.jit
def live_tile(
    tile_tensor, tile_start, numels, found_inf_ptr, HAS_FOUND_INF: tl.constexpr, BLOCK: tl.constexpr
):
    """This program's tile (see ``tiles.tile_of``); no element is live when GradScaler found an inf
    or NaN."""
    t, offs, n, full = tile_of(tile_tensor, tile_start, numels, BLOCK)
    if HAS_FOUND_INF:
        skip = tl.load(found_inf_ptr) != 0.0
        n = tl.where(skip, 0, n)
        full = full & ~skip
    return t, offs, n, full


def f32_parts(x: float) -> tuple[float, float]:
    """``x`` as two float32 scalars whose float64 sum is ``x`` to about 48 bits (for scalars a
    kernel needs in float64: Triton passes Python floats as float32)."""
    if not math.isfinite(x):
        return x, 0.0
    hi = float(np.float32(x))
    return hi, x - hi


@functools.cache
def _dummy(device: torch.device) -> Tensor:
    """Stands in for an absent tensor argument (its flag tells the kernel not to read it); one per
    device, so a steady-state step allocates nothing."""
    return torch.empty(1, device=device)


def present(device: torch.device, *tensors: Tensor | None) -> list[Tensor]:
    """The tensors, with a placeholder on ``device`` for each None."""
    return [_dummy(device) if t is None else t for t in tensors]


def split_lr(lr: float | Tensor, device: torch.device) -> tuple[float, Tensor | None]:
    """``lr`` as (a float, the tensor the kernel reads or None). A tensor on the parameters' device
    is read there (no host synchronisation, capturable); a tensor elsewhere (a CPU scalar for CUDA
    parameters) is read on the host, where that costs no synchronisation."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(
                f"lr must be a float or a one-element floating-point tensor, got a {lr.dtype} "
                f"tensor of shape {tuple(lr.shape)}"
            )
        if lr.device == device:
            return 0.0, lr
        return float(lr), None
    return float(lr), None


def launch_flags(
    params: list[Tensor],
    importances: list[Tensor],
    update: bool,
    scale: Tensor | None,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    lr_tensor: Tensor | None,
    plan: LaunchPlan,
) -> dict:
    """The compile-time arguments every masked step kernel takes."""
    return dict(
        PDT=TL_DTYPES[params[0].dtype],
        ADT=TL_DTYPES[importances[0].dtype] if importances else tl.float32,
        HAS_MASK=scale is not None,
        UPDATE=update and scale is not None,
        HAS_GRAD_SCALE=grad_scale is not None,
        HAS_FOUND_INF=found_inf is not None,
        LR_TENSOR=lr_tensor is not None,
        BLOCK=BLOCK,
        ALIGNED=plan.aligned,
        num_warps=NUM_WARPS,
    )
