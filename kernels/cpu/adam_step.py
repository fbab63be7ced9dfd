"""Native CPU masked Adam / AdamW: ``spg_adam_step_*`` of ``fused_steps.c``, with the signature of
the Triton ``adam_step_``."""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from spg_fast.kernels.cpu.launch import launch


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
    """Masked Adam (``decoupled``: AdamW) over contiguous CPU ``params``, arranged as in
    ``sgd_step_``; ``steps`` are the counts before this step, advanced here (unless GradScaler found
    an inf), ``max_exp_avg_sqs`` empty without amsgrad."""
    if len(steps) != len(params):
        raise ValueError(
            f"adam step: {len(params)} parameters take {len(params)} step counts, got {len(steps)}"
        )
    lr = float(lr)
    decoupled_wd = lr * weight_decay if decoupled else 0.0
    coupled = 0.0 if decoupled else float(weight_decay)
    state = {
        "exp_avgs": (exp_avgs, True),
        "exp_avg_sqs": (exp_avg_sqs, True),
        "max_exp_avg_sqs": (max_exp_avg_sqs, amsgrad),
    }
    double = ctypes.c_double
    launch(
        "adam",
        params,
        grads,
        keeps,
        state,
        [float(s) + 1 for s in steps],
        scale,
        update,
        grad_scale,
        found_inf,
        maximize,
        1.0 - decoupled_wd,
        decoupled_wd,
        coupled,
        double(lr),
        double(beta1),
        double(beta2),
        double(eps),
    )
    if found_inf is None or found_inf.item() == 0:
        torch._foreach_add_(steps, 1)
