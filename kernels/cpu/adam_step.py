"""Native CPU masked Adam / AdamW: ``spg_adam_step_*`` of ``fused_steps.c``, prepared for fixed
tensors (``AdamStep``) or called once (``adam_step_``, with the signature of the Triton
``adam_step_``)."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

from torch import Tensor

from spg_fast.kernels.cpu.launch import Table, scalars


class AdamStep:
    """Masked Adam (AdamW with ``decoupled``) over fixed contiguous CPU ``params``, arranged as in
    ``SGDStep``, with their state (``max_exp_avg_sqs`` empty without amsgrad) and float32 step
    counts, which the C code reads and advances (not when GradScaler found an inf)."""

    def __init__(
        self,
        params: Sequence[Tensor],
        keeps: Sequence[Tensor],
        exp_avgs: Sequence[Tensor],
        exp_avg_sqs: Sequence[Tensor],
        max_exp_avg_sqs: Sequence[Tensor],
        steps: Sequence[Tensor],
    ) -> None:
        if len(steps) != len(params) or len(exp_avgs) != len(params):
            raise ValueError(
                f"adam step: {len(params)} parameters take {len(params)} step counts and first "
                f"moments, got {len(steps)} and {len(exp_avgs)}"
            )
        buffers = [exp_avgs, exp_avg_sqs, max_exp_avg_sqs]
        self._table = Table("adam step", params, keeps, buffers, steps)
        self._amsgrad = bool(max_exp_avg_sqs)
        self._n = len(params)

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
        """One step (``update``: mask the update rather than the gradient; ``scale`` None: no
        mask yet)."""
        if amsgrad != self._amsgrad:
            raise ValueError("adam step: max_exp_avg_sqs are given exactly when amsgrad is on")
        if not self._n or (found_inf is not None and found_inf.item() != 0):
            return
        self._table.point(grads)
        head, unscale = scalars(scale, grad_scale, maximize)
        lr = float(lr)
        decoupled_wd = lr * weight_decay if decoupled else 0.0
        real, double = self._table.real, ctypes.c_double
        self._table.call(
            "adam_step",
            real(head),
            real(unscale),
            ctypes.c_int(update and scale is not None),
            real(1.0 - decoupled_wd),
            real(decoupled_wd),
            real(0.0 if decoupled else float(weight_decay)),
            double(lr),
            double(beta1),
            double(beta2),
            double(eps),
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
    """One masked Adam step over contiguous CPU ``params``; ``steps`` are the counts before it,
    advanced here (see ``AdamStep``)."""
    AdamStep(params, keeps, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)(
        grads,
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
