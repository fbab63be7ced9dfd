"""Adam and AdamW with SPG's mask read inside the update: ``spg_fast.optim.Adam`` / ``AdamW``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from spg_fast.optim.base import Batch, MaskedOptimizer, check_hyperparameters
from spg_fast.spg import SPG


class Adam(MaskedOptimizer):
    """``torch.optim.Adam`` (amsgrad, weight decay, maximize; ``decoupled_weight_decay`` for AdamW)
    updating with the SPG-masked gradient in one pass per parameter (see ``MaskedOptimizer`` for the
    paths). State keys are torch's (``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``; steps
    on the parameter's device, as torch's fused Adam keeps them), so checkpoints interchange with
    torch's Adam/AdamW."""

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        spg: SPG,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
    ) -> None:
        check_hyperparameters(lr=lr, eps=eps, weight_decay=weight_decay)
        for i, beta in enumerate(betas):
            if isinstance(beta, Tensor) or not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
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
            decoupled_weight_decay=decoupled_weight_decay,
        )
        super().__init__(params, defaults, spg)
        self.register_load_state_dict_post_hook(Adam._place_steps)

    def _place_steps(self) -> None:
        """Step counts live on the parameter's device (the kernels read them there), whatever the
        checkpoint had."""
        for group in self.param_groups:
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

    def update_group(
        self,
        group: dict[str, Any],
        batches: list[Batch],
        grad_scale: Tensor | None,
        found_inf: Tensor | None,
    ) -> None:
        beta1, beta2 = group["betas"]
        decoupled = group["decoupled_weight_decay"]
        hyper = dict(
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            amsgrad=group["amsgrad"],
            maximize=group["maximize"],
        )
        for batch in batches:
            params, (exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps) = batch.params, batch.state
            grads = batch.grads()
            kernels = self.kernels_for(
                [*params, *grads, *batch.factors, *exp_avgs, *exp_avg_sqs, *max_exp_avg_sqs]
            )
            if kernels is not None:  # they advance the step counts themselves
                kernels.adam_step_(
                    params,
                    grads,
                    batch.factors,
                    exp_avgs,
                    exp_avg_sqs,
                    max_exp_avg_sqs,
                    steps,
                    batch.scale,
                    grad_scale,
                    found_inf,
                    decoupled=decoupled,
                    **hyper,
                )
                continue
            torch._foreach_add_(steps, 1 if found_inf is None else 1 - found_inf)
            self.spg.mask_gradients(batch.keys)
            fused = torch._fused_adamw_ if decoupled else torch._fused_adam_
            fused(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                max_exp_avg_sqs,
                steps,
                grad_scale=grad_scale,
                found_inf=found_inf,
                **hyper,
            )


class AdamW(Adam):
    """``torch.optim.AdamW`` (decoupled weight decay, default 1e-2) with SPG's mask;
    see ``Adam``."""

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        spg: SPG,
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
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
        )
