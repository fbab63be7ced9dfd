"""An SGD that records, at every step, the gradients its update is about to use (after any closure
has run)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class RecordingSGD(torch.optim.SGD):
    """``torch.optim.SGD`` over ``model``'s parameters; ``seen[i]`` maps parameter name to the
    gradient step ``i`` applied. A step pre-hook would not do: Lightning passes a closure that runs
    backward inside ``step``."""

    def __init__(self, model: nn.Module, lr: float) -> None:
        super().__init__(model.parameters(), lr=lr)
        self._names = {p: n for n, p in model.named_parameters()}
        self.seen: list[dict[str, torch.Tensor]] = []

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.seen.append(
            {
                self._names[p]: p.grad.clone()
                for g in self.param_groups
                for p in g["params"]
                if p.grad is not None
            }
        )
        super().step()
        return loss
