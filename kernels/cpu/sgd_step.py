"""Native CPU masked SGD: ``spg_sgd_step_*`` of ``fused_steps.c``, with the signature of the Triton
``sgd_step_``."""

from __future__ import annotations

import ctypes

from torch import Tensor

from spg_fast.kernels.cpu.launch import launch


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
    """Masked SGD over contiguous CPU ``params`` of one dtype, shared first (their stored keep
    factors ``keeps``), then heads (keep factor ``scale``; None: no mask yet); ``update``: mask the
    update rather than the gradient. Momentum buffers (none without momentum) are set to the
    (masked) gradient where ``first_step``."""
    if len(first_step) != len(params):
        raise ValueError(
            f"sgd step: {len(params)} parameters take {len(params)} first-step flags, got "
            f"{len(first_step)}"
        )
    launch(
        "sgd",
        params,
        grads,
        keeps,
        {"momentum buffers": (momentum_buffers, momentum != 0)},
        [float(f) for f in first_step],
        scale,
        update,
        grad_scale,
        found_inf,
        maximize,
        float(lr),
        float(weight_decay),
        float(momentum),
        1.0 - dampening,
        ctypes.c_int(nesterov),
    )
