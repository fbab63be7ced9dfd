"""Elastic weight consolidation (Kirkpatrick et al., PNAS 2017) in its online form: after each task
the diagonal of the empirical Fisher information of that task, folded into a running mean over the
tasks, and one anchor, the weights the last task ended with. Every later training step adds the
quadratic penalty ``lambda/2 * sum F * (theta - theta*)^2`` over all parameters.

The conventions are those of the code base whose penalty weight the preset takes (HAT's EWC,
joansj/hat, reused by PyContinual from the SPG authors' group): the Fisher diagonal is the squared
gradient of the mean cross-entropy of mini-batches of 20, weighted by the batch's size and divided
by the number of samples, with the model in train mode (dropout active); the running mean is
``F <- (F_new + t * F) / (t + 1)`` after task ``t``; lambda 5000 (their grid 500 ... 50000).
**Defined here**: the last mini-batch is weighted by its own size (their code counts it as 20)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spg_fast.harness.methods.base import Batch, Method, PassReport, TaskData

FISHER_BATCH = 20


class Ewc(Method):
    """EWC with penalty weight ``lamb``; one process only."""

    one_process = True

    def __init__(self, lamb: float) -> None:
        self.lamb = lamb
        self.params: dict[str, nn.Parameter] = {}
        self.fisher: dict[str, Tensor] = {}
        self.anchor: dict[str, Tensor] = {}
        self.tasks = 0

    def bind(self, model: nn.Module) -> None:
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        loss = super().loss(model, batch)
        return loss + self.penalty() if self.tasks else loss

    def penalty(self) -> Tensor:
        """``lambda/2 * sum over parameters of F * (theta - theta*)^2``."""
        total = sum(
            (self.fisher[n] * (p - self.anchor[n]).square()).sum() for n, p in self.params.items()
        )
        return self.lamb / 2 * total

    def end_task(self, model: nn.Module, data: TaskData, report: PassReport | None) -> None:
        new = fisher_diagonal(model, data, report)
        t = self.tasks
        self.fisher = {n: (f + t * self.fisher[n]) / (t + 1) if t else f for n, f in new.items()}
        self.anchor = {n: p.detach().clone() for n, p in self.params.items()}
        self.tasks += 1

    def state_dict(self) -> dict[str, Any]:
        return {"tasks": self.tasks, "fisher": self.fisher, "anchor": self.anchor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tasks, self.fisher, self.anchor = state["tasks"], state["fisher"], state["anchor"]


def fisher_diagonal(
    model: nn.Module, data: TaskData, report: PassReport | None = None
) -> dict[str, Tensor]:
    """The empirical Fisher diagonal of head ``data.task`` on its training data: the sum over
    mini-batches of ``FISHER_BATCH`` of the batch size times the squared gradient of the batch's
    mean cross-entropy, over the number of samples. Train mode; the model's mode is restored."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    sums = {n: torch.zeros_like(p) for n, p in named}
    training = model.training
    model.train()
    batches = -(-data.size // FISHER_BATCH)
    try:
        for i, (x, y, _) in enumerate(data.batches(FISHER_BATCH), 1):
            loss = F.cross_entropy(model(x, data.task), y)
            grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
            for (n, _), g in zip(named, grads, strict=True):
                if g is not None:
                    sums[n].add_(g.square(), alpha=len(y))
            if report is not None:
                report("fisher diagonal", i, batches)
    finally:
        model.train(training)
    return {n: s / data.size for n, s in sums.items()}
