"""SGD with SPG's mask inside the update: ``spg_fast.optim.SGD``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from spg_fast._backend import StepKernels
from spg_fast.mask_mode import MaskMode
from spg_fast.optim.base import Batch, MaskedOptimizer, torch_checked
from spg_fast.spg import SPG


class SGD(MaskedOptimizer):
    """``torch.optim.SGD`` (momentum, dampening, nesterov, weight decay, maximize) with SPG's mask
    in one pass per parameter (see ``MaskedOptimizer`` for the paths).

    Args:
        params, lr, momentum, dampening, weight_decay, nesterov, maximize: as for
            ``torch.optim.SGD``, checked by torch itself (named parameters and param groups
            included).
        spg: the SPG object whose mask the step applies.
        mask: ``"auto"`` (the default: the paper's gradient mask without weight decay, the update
            mask with it), ``"gradient"`` or ``"update"`` (``spg_fast.mask_mode``).
        foreach, fused: None, or ``fused=True``: the step is always fused; ``foreach=True`` and
            ``fused=False`` are refused (use ``spg.wrap`` around torch's SGD for those).
        differentiable: refused when True.

    State keys are torch's (``momentum_buffer``), so checkpoints interchange with
    ``torch.optim.SGD``.
    """

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        *,
        spg: SPG,
        mask: MaskMode = "auto",
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
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
        groups = torch_checked(torch.optim.SGD, params, defaults)
        super().__init__(groups, defaults, spg, mask)

    def state_lists(
        self, group: dict[str, Any], params: list[Tensor]
    ) -> tuple[tuple[list[Tensor], ...], list[bool]]:
        if not group["momentum"]:
            return ([],), [False] * len(params)
        first = [not self.state[p] for p in params]
        for p, is_first in zip(params, first, strict=True):
            if is_first:
                buffer = torch.zeros_like(p, memory_format=torch.preserve_format)
                self.state[p]["momentum_buffer"] = buffer
        return ([self.state[p]["momentum_buffer"] for p in params],), first

    def state_layout(self, group: dict[str, Any]) -> tuple:
        return (bool(group["momentum"]),)

    @staticmethod
    def _hyper(group: dict[str, Any]) -> dict[str, Any]:
        return dict(
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
        )

    def prepare(
        self,
        kernels: StepKernels,
        params: list[Tensor],
        keeps: list[Tensor],
        state: tuple[list[Tensor], ...],
    ) -> Callable[..., None]:
        (bufs,) = state
        return kernels.sgd(params, keeps, bufs)

    def fused_step(
        self,
        group: dict[str, Any],
        batch: Batch,
        update: bool,
        grad_scale: Tensor | None,
        found_inf: Tensor | None,
    ) -> None:
        batch.fused(
            batch.grads(),
            batch.first_step,
            batch.scale,
            update,
            grad_scale,
            found_inf,
            **self._hyper(group),
        )

    def torch_step(
        self,
        group: dict[str, Any],
        batch: Batch,
        grad_scale: Tensor | None,
        found_inf: Tensor | None,
    ) -> None:
        (bufs,) = batch.state
        params, grads, first = batch.params, batch.grads(), batch.first_step
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
                    **self._hyper(group),
                )
