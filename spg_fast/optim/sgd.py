"""SGD with SPG's mask read inside the update: ``spg_fast.optim.SGD``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from spg_fast.optim.base import Batch, MaskedOptimizer, check_hyperparameters
from spg_fast.spg import SPG


class SGD(MaskedOptimizer):
    """``torch.optim.SGD`` (momentum, dampening, nesterov, weight decay, maximize) updating with the
    SPG-masked gradient in one pass per parameter (see ``MaskedOptimizer`` for the paths). State
    keys are torch's (``momentum_buffer``), so checkpoints interchange with ``torch.optim.SGD``."""

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        *,
        spg: SPG,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        check_hyperparameters(lr=lr, momentum=momentum, weight_decay=weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            foreach=foreach,
            differentiable=differentiable,
            fused=fused,
        )
        super().__init__(params, defaults, spg)

    def state_lists(
        self, group: dict[str, Any], params: list[Tensor]
    ) -> tuple[tuple[list[Tensor], ...], list[bool]]:
        if not group["momentum"]:
            return ([],), [False] * len(params)
        first = [not self.state[p] for p in params]
        for p, is_first in zip(params, first, strict=True):
            if is_first:
                self.state[p]["momentum_buffer"] = torch.zeros_like(
                    p, memory_format=torch.preserve_format
                )
        return ([self.state[p]["momentum_buffer"] for p in params],), first

    def update_group(
        self,
        group: dict[str, Any],
        batches: list[Batch],
        grad_scale: Tensor | None,
        found_inf: Tensor | None,
    ) -> None:
        hyper = dict(
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
        )
        for batch in batches:
            params, (bufs,), first = batch.params, batch.state, batch.first_step
            grads = batch.grads()
            kernels = self.kernels_for([*params, *grads, *batch.factors, *bufs])
            if kernels is not None:
                kernels.sgd_step_(
                    params,
                    grads,
                    batch.factors,
                    bufs,
                    first,
                    batch.scale,
                    grad_scale,
                    found_inf,
                    **hyper,
                )
                continue
            self.spg.mask_gradients(batch.keys)
            # torch's fused kernel takes one is_first_step flag per call: parameters without a
            # momentum buffer before this step (all on the first step; later, a head added since) go
            # in a call of their own.
            for is_first in (True, False):
                chosen = [i for i, f in enumerate(first) if f == is_first]
                if chosen:
                    torch._fused_sgd_(
                        [params[i] for i in chosen],
                        [grads[i] for i in chosen],
                        [bufs[i] for i in chosen] if bufs else [],
                        is_first_step=is_first,
                        grad_scale=grad_scale,
                        found_inf=found_inf,
                        **hyper,
                    )
