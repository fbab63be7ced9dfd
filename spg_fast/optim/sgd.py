"""SGD with SPG's mask read inside the update: ``spg_fast.optim.SGD``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from spg_fast.optim.base import MaskedOptimizer, check_hyperparameters
from spg_fast.spg import SPG


def _add_masked_(dst: list[Tensor], grads: list[Tensor], keeps: list[Tensor] | None, value: float) -> None:
    """``dst += value * grad * keep`` (``keep`` folded into an addcmul where torch has an add)."""
    if keeps is None:
        torch._foreach_add_(dst, grads, alpha=value)
    else:
        torch._foreach_addcmul_(dst, grads, keeps, value=value)


def sgd_foreach(params: list[Tensor], grads: list[Tensor], keeps: list[Tensor] | None, bufs: list[Tensor | None],
                *, lr: float, weight_decay: float, momentum: float, dampening: float, nesterov: bool,
                maximize: bool) -> list[Tensor | None]:
    """torch's foreach SGD on the masked gradient ``grad * keep``; returns the momentum buffers."""
    sign = -1.0 if maximize else 1.0
    d_p = None  # None stands for sign * grad * keep, never materialised unless needed
    if weight_decay:
        d_p = torch._foreach_mul(params, weight_decay)
        _add_masked_(d_p, grads, keeps, sign)
    if momentum:
        first = [i for i, b in enumerate(bufs) if b is None]
        later = [i for i, b in enumerate(bufs) if b is not None]
        for i in first:
            bufs[i] = (d_p[i].clone() if d_p is not None else
                       grads[i].mul(keeps[i] if keeps is not None else 1.0).mul_(sign).to(params[i].dtype))
        if later:
            old = [bufs[i] for i in later]
            torch._foreach_mul_(old, momentum)
            if d_p is None:
                _add_masked_(old, [grads[i] for i in later], None if keeps is None else [keeps[i] for i in later],
                             sign * (1 - dampening))
            else:
                torch._foreach_add_(old, [d_p[i] for i in later], alpha=1 - dampening)
        if nesterov:
            if d_p is None:
                d_p = torch._foreach_mul(bufs, momentum)
                _add_masked_(d_p, grads, keeps, sign)
            else:
                torch._foreach_add_(d_p, bufs, alpha=momentum)
        else:
            d_p = list(bufs)
    if d_p is None:
        _add_masked_(params, grads, keeps, -lr * sign)
    else:
        torch._foreach_add_(params, d_p, alpha=-lr)
    return bufs


class SGD(MaskedOptimizer):
    """``torch.optim.SGD`` (momentum, dampening, nesterov, weight decay, maximize) updating with the SPG-masked
    gradient, in one pass per parameter on the Triton backend. State keys are torch's (``momentum_buffer``), so
    checkpoints interchange with ``torch.optim.SGD``."""

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

    def update_group(self, group: dict[str, Any], params: list[Tensor], grad_scale: Tensor | None,
                     found_inf: Tensor | None) -> None:
        hyper = dict(lr=group["lr"], weight_decay=group["weight_decay"], momentum=group["momentum"],
                     dampening=group["dampening"], nesterov=group["nesterov"], maximize=group["maximize"])
        if not self.fused_kernels:
            bufs = [self.state[p].get("momentum_buffer") for p in params]
            bufs = sgd_foreach(params, [p.grad for p in params], self.keep_factors(params), bufs, **hyper)
            if hyper["momentum"]:
                for p, b in zip(params, bufs, strict=True):
                    self.state[p]["momentum_buffer"] = b
            return
        from spg_fast.kernels.optimizer_steps import sgd_step_

        for batch, importances, scale in self.fused_batches(params):
            bufs, first = [], []
            if hyper["momentum"]:
                for p in batch:
                    first.append("momentum_buffer" not in self.state[p])
                    bufs.append(self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)))
            sgd_step_(batch, [p.grad for p in batch], importances, bufs, first, scale, grad_scale, found_inf,
                      **hyper)
