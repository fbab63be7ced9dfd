"""Native CPU masked SGD: ``spg_sgd_step_*`` of ``fused_steps.c``, prepared for fixed tensors
(``SGDStep``) or called once (``sgd_step_``, with the signature of the Triton ``sgd_step_``)."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

from torch import Tensor

from spg_fast.kernels.cpu.launch import Table, scalars


class SGDStep:
    """Masked SGD over fixed contiguous CPU ``params`` of one dtype, shared first (their stored
    keep factors ``keeps``), then heads, with their ``momentum_buffers`` (empty without momentum).
    Each call steps with that call's gradients; the table is built once."""

    def __init__(
        self, params: Sequence[Tensor], keeps: Sequence[Tensor], momentum_buffers: Sequence[Tensor]
    ) -> None:
        self._table = Table("sgd step", params, keeps, [momentum_buffers])
        self._momentum = bool(momentum_buffers)
        self._first: list[bool] | None = None
        self._n = len(params)

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
        """One step (``update``: mask the update rather than the gradient; ``scale`` None: no
        mask yet); momentum buffers are set to the (masked) gradient where ``first_step``."""
        if len(first_step) != self._n:
            raise ValueError(
                f"sgd step: {self._n} parameters take {self._n} first-step flags, got "
                f"{len(first_step)}"
            )
        if (momentum != 0) != self._momentum:
            raise ValueError("sgd step: momentum buffers are given exactly when momentum is not 0")
        if not self._n or (found_inf is not None and found_inf.item() != 0):
            return
        self._table.point(grads)
        if list(first_step) != self._first:
            self._table.set_aux(first_step)
            self._first = list(first_step)
        head, unscale = scalars(scale, grad_scale, maximize)
        real = self._table.real
        self._table.call(
            "sgd_step",
            real(head),
            real(unscale),
            ctypes.c_int(update and scale is not None),
            real(float(lr)),
            real(float(weight_decay)),
            real(float(momentum)),
            real(1.0 - dampening),
            ctypes.c_int(nesterov),
        )


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
    """One masked SGD step over contiguous CPU ``params`` (see ``SGDStep``)."""
    if len(momentum_buffers) not in (0, len(params)) or (momentum != 0) != bool(momentum_buffers):
        raise ValueError(
            f"sgd step: {len(params)} parameters take {len(params) if momentum else 0} momentum "
            f"buffers, got {len(momentum_buffers)}"
        )
    SGDStep(params, keeps, momentum_buffers)(
        grads,
        first_step,
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
