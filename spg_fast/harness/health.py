"""Whether a run still learns. A non-finite training loss or weight stops the run
(``DivergedError``, naming the task and epoch). A task that ends at chance accuracy after its
training loss exploded (above ``EXPLODED`` times the loss of a uniform guess, ``ln(classes)``) is
flagged (``exploded``): the protocol restores the best weights, so such a task ends with finite
weights and the run goes on, but its results say nothing about forgetting."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from spg_fast.harness.parallel import Ranks

EXPLODED = 10.0  # times ln(classes)
CHANCE_MARGIN = 0.1  # of the way from chance to 1


class DivergedError(Exception):
    """Training produced a non-finite loss or weight in ``task``'s ``epoch``."""

    def __init__(self, task: int, epoch: int, why: str) -> None:
        super().__init__(f"task {task} epoch {epoch}: {why}")
        self.task, self.epoch, self.why = task, epoch, why


def first_nonfinite(tensors: Iterable[tuple[str, Tensor]]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or infinity, or None."""
    for name, t in tensors:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def check_epoch(model: nn.Module, task: int, epoch: int, train_loss: float, ranks: Ranks) -> None:
    """Raise ``DivergedError`` if the epoch's training loss or any weight (on any process) is not
    finite. Every process reaches the same decision."""
    if not math.isfinite(train_loss):
        raise DivergedError(task, epoch, f"non-finite training loss ({train_loss})")
    bad = first_nonfinite((n, p.detach()) for n, p in model.named_parameters())
    if ranks.sum([float(bad is not None)])[0]:
        where = bad if bad is not None else "a parameter of another process"
        raise DivergedError(task, epoch, f"non-finite weights in {where}")


def exploded(accuracy: float, classes: int, train_losses: list[float]) -> str | None:
    """Why a finished task counts as diverged (at chance accuracy after an exploding training
    loss), or None."""
    chance = 1 / classes
    worst = max(train_losses)
    if accuracy <= chance + CHANCE_MARGIN * (1 - chance) and worst > EXPLODED * math.log(classes):
        return (
            f"accuracy {accuracy:.3f} at chance ({chance:.3f}) after the training loss reached "
            f"{worst:.4g} (a uniform guess: {math.log(classes):.3f})"
        )
    return None
