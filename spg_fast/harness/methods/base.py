"""What every method the harness compares has: its network, its optimizer, its training loss, what
it does around each optimizer step and after each task, its state for checkpoints and its capacity
measure. ``Method`` itself is fine-tuning: one network, plain cross-entropy, nothing in between."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Progress of a pass over a task's data after training: (label, batches done, batches or None).
PassReport = Callable[[str, int, int | None], None]


@dataclass(frozen=True)
class Batch:
    """One training mini-batch (this process's share of it): inputs, labels, the task, the batch's
    size over the number of processes (the summed loss divided by it is the batch's mean over all
    processes) and where the batch starts in the epoch, as a fraction of the training set."""

    x: Tensor
    y: Tensor
    task: int
    per_rank: float
    position: float


@dataclass(frozen=True)
class TaskData:
    """A finished task's training data as a method's end-of-task pass reads it: ``size`` samples,
    the protocol's ``batch_size``, and ``batches(size)``: this process's (x, y, per_rank) shares of
    mini-batches of ``size`` in stored order."""

    task: int
    size: int
    batch_size: int
    batches: Callable[[int], Iterator[tuple[Tensor, Tensor, float]]]


class Method:
    """Fine-tuning: every task trains the same network with plain cross-entropy. Subclasses change
    the hooks they need."""

    network_per_task = False  # "one": a fresh network for every task
    one_process = False  # True: refused under torchrun

    def network(self, net: nn.Module) -> nn.Module:
        """The network this method trains, built around the backbone ``net``."""
        return net

    def bind(self, model: nn.Module) -> None:
        """Called once with the shared network as trained (wrapped for several processes)."""

    def optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The optimizer a task steps (a fresh ``optimizer`` every task)."""
        return optimizer

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """The training loss of ``batch``."""
        return (
            F.cross_entropy(model(batch.x, batch.task), batch.y, reduction="sum") / batch.per_rank
        )

    def before_step(self, model: nn.Module, batch: Batch) -> None:
        """After ``backward``, before the optimizer step."""

    def after_step(self, model: nn.Module, batch: Batch) -> None:
        """After the optimizer step."""

    def end_task(self, model: nn.Module, data: TaskData, report: PassReport | None) -> None:
        """After task ``data.task`` trained (best weights restored): the method's pass over the
        task's data, if any; ``report`` is called after every batch of it."""

    def usage(self) -> dict[str, Any] | None:
        """How much of the network the method has claimed so far, or None when it has no
        measure."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """The method's own state (beyond the networks) for a checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``'s state."""


class One(Method):
    """A fresh network for every task (no sharing, no forgetting): the upper reference."""

    network_per_task = True
