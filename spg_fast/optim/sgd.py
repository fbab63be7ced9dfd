"""SGD with SPG's mask read inside the update: ``spg_fast.optim.SGD``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from spg_fast.optim.base import MaskedOptimizer, check_hyperparameters
from spg_fast.spg import SPG


class SGD(MaskedOptimizer):
    """``torch.optim.SGD`` (momentum, dampening, nesterov, weight decay, maximize) updating with the SPG-masked
    gradient in one pass per parameter (see ``MaskedOptimizer`` for the paths).
    State keys are torch's (``momentum_buffer``), so checkpoints interchange with ``torch.optim.SGD``."""

    def __init__(self, params: Any, lr: float = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float = 0, nesterov: bool = False, *, spg: SPG, maximize: bool = False,
                 foreach: bool | None = None, differentiable: bool = False, fused: bool | None = None,
                 backend: str = "auto") -> None:
        check_hyperparameters(lr=lr, momentum=momentum, weight_decay=weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=differentiable,
                        fused=fused)
        super().__init__(params, defaults, spg, backend)

    def _momentum_buffer(self, p: Tensor, new: Any) -> Tensor:
        """``p``'s momentum buffer, created with ``new(p)`` only when it has none yet."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = new(p)
        return state["momentum_buffer"]

    def update_group(self, group: dict[str, Any], params: list[Tensor], grad_scale: Tensor | None,
                     found_inf: Tensor | None) -> None:
        hyper = dict(lr=group["lr"], weight_decay=group["weight_decay"], momentum=group["momentum"],
                     dampening=group["dampening"], nesterov=group["nesterov"], maximize=group["maximize"])
        momentum = hyper["momentum"]
        for batch, factors, scale in self.batches(params):
            grads = [p.grad for p in batch]
            first = [momentum != 0 and "momentum_buffer" not in self.state[p] for p in batch]
            bufs = [self._momentum_buffer(p, torch.zeros_like) for p in batch] if momentum else []
            kernels = self.kernels_for([*batch, *grads, *factors, *bufs])
            if kernels is not None:
                kernels.sgd_step_(batch, grads, factors, bufs, first, scale, grad_scale, found_inf, **hyper)
                continue
            self.spg.mask_gradients(batch)
            # torch's fused kernel takes one is_first_step flag per call: parameters without a momentum buffer
            # before this step (all on the first step; later, a head added since) go in a call of their own.
            for is_first in (True, False):
                chosen = [i for i, f in enumerate(first) if f == is_first]
                if chosen:
                    torch._fused_sgd_([batch[i] for i in chosen], [grads[i] for i in chosen],
                                      [bufs[i] for i in chosen] if momentum else [], is_first_step=is_first,
                                      grad_scale=grad_scale, found_inf=found_inf, **hyper)
