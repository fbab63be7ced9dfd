"""What the fused masked optimizers share: construction checks, the per-step mask plan, GradScaler and closures."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from spg_fast.backend import BACKENDS, fused_steps
from spg_fast.spg import SPG


def check_hyperparameters(**values: float) -> None:
    """Non-negative hyperparameters, with torch's messages (``Invalid learning rate: -1``)."""
    names = {"lr": "learning rate", "eps": "epsilon value", "weight_decay": "weight_decay value",
             "momentum": "momentum value", "dampening": "dampening value"}
    for key, value in values.items():
        if isinstance(value, Tensor):
            raise TypeError(f"{key} as a Tensor is not supported; pass a float")
        if not value >= 0.0:
            raise ValueError(f"Invalid {names[key]}: {value}")


class MaskedOptimizer(Optimizer):
    """Base of ``spg_fast.optim``'s optimizers: torch's update with SPG's mask read inside it.

    The update equals "mask the gradient, then step torch's optimizer"; ``spg_fast.backend.fused_steps`` picks how
    per batch of one dtype. The Triton kernels (CUDA) and the native CPU kernels (contiguous float32/float64) read
    the mask inside one pass and leave ``.grad`` as backward produced it. Otherwise ``.grad`` is masked in place
    (the spec's ``grad <- grad * (1 - A)``) and torch's fused kernel steps. On the CPU the native AdamW step
    measured 1.22x torch's unmasked fused step, mask + torch's fused step 1.45-1.48x (bench/NOTES.md). All take
    GradScaler's ``grad_scale``/``found_inf``.
    """

    def __init__(self, params: Any, defaults: dict[str, Any], spg: SPG, backend: str) -> None:
        if not isinstance(spg, SPG):
            raise TypeError(f"spg must be an spg_fast.SPG, got {type(spg).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")
        if backend != "auto" and backend != spg.backend:
            raise ValueError(f"backend={backend!r} differs from the SPG object's backend {spg.backend!r}; the "
                             "optimizer reads the mask that the SPG backend stores, so pass the same to both")
        if defaults.get("differentiable"):
            raise ValueError("differentiable=True is not supported by spg_fast.optim")
        super().__init__(params, defaults)
        self.spg = spg
        self._step_supports_amp_scaling = True
        spg.register_user(self, type(self).__name__)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "spg"):  # Optimizer.__init__ adds the first groups before self.spg exists
            params = param_group["params"]
            params = [params] if isinstance(params, Tensor) else list(params)
            self.spg.check_parameters(params, f"{type(self).__name__}.add_param_group")
            param_group = {**param_group, "params": params}
        super().add_param_group(param_group)

    def _groups_with_grads(self) -> Iterator[tuple[dict[str, Any], list[Tensor]]]:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse:
                    raise TypeError(f"{type(self).__name__}: a parameter of shape {tuple(p.shape)} has a sparse "
                                    "gradient, which is not supported")
            if params:
                yield group, params

    def batches(self, params: list[Tensor]) -> Iterator[tuple[list[Tensor], list[Tensor], Tensor | None]]:
        """Per dtype, the parameters (shared first, then heads), the shared ones' mask factors (the backend's, see
        ``spg_fast.backend.Ops``) and the head scale (None before the first task: no mask)."""
        plan = self.spg.mask_plan(params)
        batches: dict[torch.dtype, tuple[list[Tensor], list[Tensor], list[Tensor]]] = {}
        for i, p in enumerate(params):
            shared, importances, heads = batches.setdefault(p.dtype, ([], [], []))
            factor = None if plan is None else plan[0][i]
            if plan is not None and factor is not None:
                shared.append(p)
                importances.append(factor)
            else:
                heads.append(p)
        scale = None if plan is None else plan[1]
        for shared, importances, heads in batches.values():
            yield shared + heads, importances, scale

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scaler = (getattr(self, "grad_scale", None), getattr(self, "found_inf", None))
        for group, params in self._groups_with_grads():
            self.update_group(group, params, *scaler)
        return loss

    def kernels_for(self, tensors: list[Tensor]) -> ModuleType | None:
        """The fused steps serving a batch (every tensor its step touches); None: mask ``.grad``, then torch's."""
        return fused_steps(self.spg.backend, tensors)

    def update_group(self, group: dict[str, Any], params: list[Tensor], grad_scale: Tensor | None,
                     found_inf: Tensor | None) -> None:
        raise NotImplementedError
