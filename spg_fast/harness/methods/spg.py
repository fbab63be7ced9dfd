"""SPG through its public integration, as a user writes it: ``SPG(model, heads="heads")``, every
task's optimizer wrapped with ``spg.wrap(optimizer, mask=...)``, ``spg.end_task`` after each task
and ``spg.usage()`` for the capacity used."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spg_fast import PassProgress
from spg_fast.harness.methods.base import Method, PassReport, TaskData
from spg_fast.spg import SPG


class Spg(Method):
    """Parameter-level soft-masking (Konishi et al., ICML 2023). ``mask``: ``auto``, ``gradient``
    or ``update`` (``spg.wrap``'s modes); ``backend``: SPG's implementation."""

    def __init__(self, mask: str, backend: str) -> None:
        self.mask, self.backend = mask, backend
        self.spg: SPG | None = None

    def bind(self, model: nn.Module) -> None:
        self.spg = SPG(model, heads="heads", backend=self.backend)

    def optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return self.spg.wrap(optimizer, mask=self.mask)

    def end_task(self, model: nn.Module, data: TaskData, report: PassReport | None) -> None:
        """The importance pass over the task's training mini-batches, with the training loss's
        weighting (over several processes SPG adds the ranks' gradient sums)."""
        self.spg.end_task(
            data.task,
            list(data.batches(data.batch_size)),
            loss_fn=_share_loss,
            prepare_batch=_share_batch,
            progress=None if report is None else partial(_pass_progress, report),
        )

    def usage(self) -> dict[str, Any]:
        """``spg.usage()``'s overall figures: mean ``A``, the fractions of shared elements above 0.5
        and 0.9, and the head scale ``1 - mean(A)``."""
        used = self.spg.usage()
        return {
            "of": "parameters",
            "mean": used.mean,
            "above_0.5": used.above_0_5,
            "above_0.9": used.above_0_9,
            "head_scale": used.head_scale,
        }

    def state_dict(self) -> dict[str, Any]:
        return self.spg.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.spg.load_state_dict(state)


def _pass_progress(report: PassReport, p: PassProgress) -> None:
    report(f"importance head {p.head} ({p.heads_done} of {p.heads} heads done)", p.batch, p.batches)


def _share_batch(batch: tuple[Tensor, Tensor, float]) -> tuple[Tensor, tuple[Tensor, float]]:
    x, y, per_rank = batch
    return x, (y, per_rank)


def _share_loss(logits: Tensor, target: tuple[Tensor, float]) -> Tensor:
    """The importance pass's loss for the task's head: as in training, so that the ranks'
    gradient sums add up to one process's."""
    y, per_rank = target
    return F.cross_entropy(logits, y, reduction="sum") / per_rank
