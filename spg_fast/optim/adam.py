"""Adam and AdamW with SPG's mask inside the update: ``spg_fast.optim.Adam`` / ``AdamW``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from spg_fast._backend import StepKernels
from spg_fast.mask_mode import MaskMode
from spg_fast.optim.base import Batch, MaskedOptimizer, torch_checked
from spg_fast.spg import SPG


class Adam(MaskedOptimizer):
    """``torch.optim.Adam`` (amsgrad, weight decay, maximize; ``decoupled_weight_decay`` for AdamW)
    with SPG's mask in one pass per parameter (see ``MaskedOptimizer`` for the paths).

    Args:
        params, lr, betas, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay: as for
            ``torch.optim.Adam``, checked by torch itself (named parameters and param groups
            included); ``lr`` may be a one-element tensor (on the parameters' device it is read by
            the kernels, so a scheduler that changes it in place needs no host synchronisation);
            ``betas`` must be floats.
        spg: the SPG object whose mask the step applies.
        mask: ``"auto"`` (the default, which is ``"update"`` for Adam: the update mask protects
            under Adam, the gradient mask does not), ``"gradient"`` or ``"update"``
            (``spg_fast.mask_mode``).
        foreach, fused: None, or ``fused=True``: the step is always fused; ``foreach=True`` and
            ``fused=False`` are refused (use ``spg.wrap`` around torch's Adam for those).
        capturable: accepted either way: the step always keeps its step counts on the parameters'
            device and reads ``lr`` (a tensor), GradScaler's scale and its inf flag there, with no
            host synchronisation on CUDA, so it can be captured in a CUDA graph.
        differentiable: refused when True.

    State keys are torch's (``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``; steps on
    the parameter's device, as torch's fused Adam keeps them), so checkpoints interchange with
    torch's Adam/AdamW.
    """

    _torch_class: type[torch.optim.Optimizer] = torch.optim.Adam

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        spg: SPG,
        mask: MaskMode = "auto",
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
        )
        if self._torch_class is torch.optim.Adam:
            defaults["decoupled_weight_decay"] = decoupled_weight_decay
        groups = torch_checked(self._torch_class, params, defaults)
        defaults["decoupled_weight_decay"] = decoupled_weight_decay
        super().__init__(groups, defaults, spg, mask)
        self.register_load_state_dict_post_hook(Adam._place_steps)

    def _place_steps(self) -> None:
        """Step counts live on the parameter's device (the kernels read them there), whatever the
        checkpoint had; a group from torch's AdamW gets its decoupled weight decay back."""
        for group in self.param_groups:
            group.setdefault("decoupled_weight_decay", self.defaults["decoupled_weight_decay"])
            for p in group["params"]:
                state = self.state.get(p)
                if state and "step" in state:
                    state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(p.device)

    def state_lists(
        self, group: dict[str, Any], params: list[Tensor]
    ) -> tuple[tuple[list[Tensor], ...], list[bool]]:
        amsgrad = group["amsgrad"]
        states, first = [self.state[p] for p in params], []
        for p, state in zip(params, states, strict=True):
            first.append(not state)
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if amsgrad and "max_exp_avg_sq" not in state:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return (
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [s["max_exp_avg_sq"] for s in states] if amsgrad else [],
            [s["step"] for s in states],
        ), first

    def state_layout(self, group: dict[str, Any]) -> tuple:
        return (bool(group["amsgrad"]),)

    @staticmethod
    def _hyper(group: dict[str, Any]) -> dict[str, Any]:
        beta1, beta2 = group["betas"]
        return dict(
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            amsgrad=group["amsgrad"],
            maximize=group["maximize"],
        )

    def prepare(
        self,
        kernels: StepKernels,
        params: list[Tensor],
        keeps: list[Tensor],
        state: tuple[list[Tensor], ...],
    ) -> Callable[..., None]:
        return kernels.adam(params, keeps, *state)

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
            batch.scale,
            update,
            grad_scale,
            found_inf,
            decoupled=group["decoupled_weight_decay"],
            **self._hyper(group),
        )  # the kernels advance the step counts themselves

    def torch_step(
        self,
        group: dict[str, Any],
        batch: Batch,
        grad_scale: Tensor | None,
        found_inf: Tensor | None,
    ) -> None:
        exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = batch.state
        torch._foreach_add_(steps, 1 if found_inf is None else 1 - found_inf)
        fused = torch._fused_adamw_ if group["decoupled_weight_decay"] else torch._fused_adam_
        fused(
            batch.params,
            batch.grads(),
            exp_avgs,
            exp_avg_sqs,
            max_exp_avg_sqs,
            steps,
            grad_scale=grad_scale,
            found_inf=found_inf,
            **self._hyper(group),
        )


class AdamW(Adam):
    """``torch.optim.AdamW`` (decoupled weight decay, default 1e-2) with SPG's mask; see
    ``Adam``."""

    _torch_class = torch.optim.AdamW

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        spg: SPG,
        mask: MaskMode = "auto",
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            spg=spg,
            mask=mask,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
        )
