"""The training protocol (the paper's: SGD, LR divided on a validation plateau, early stopping, best weights) and
the methods it compares: ``spg`` (through the public integration), ``finetune`` and ``one``."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spg_fast.harness.models import MultiHeadNet
from spg_fast.harness.sequences import Split, TaskSequence
from spg_fast.spg import SPG

METHODS = ("spg", "finetune", "one")


@dataclass
class TrainConfig:
    """The protocol's settings; the defaults finish the embedded digits sequence in about a minute on 2 cores."""

    lr: float = 0.1
    lr_factor: float = 3.0
    lr_min: float = 1e-3
    lr_patience: int = 3
    max_epochs: int = 60
    batch_size: int = 64
    dropout: float = 0.0


def batches(split: Split, batch_size: int, device: torch.device, generator: torch.Generator | None = None
            ) -> Iterator[tuple[Tensor, Tensor]]:
    """Mini-batches of ``split`` on ``device`` (shuffled with ``generator``, in order without); uint8 images are
    scaled to [0, 1]."""
    order = torch.randperm(len(split), generator=generator) if generator is not None else torch.arange(len(split))
    for idx in order.split(batch_size):
        x = split.x[idx]
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        yield x.to(device), split.y[idx].to(device)


@torch.no_grad()
def evaluate(model: MultiHeadNet, task: int, split: Split, batch_size: int, device: torch.device
             ) -> tuple[float, float]:
    """(mean loss, accuracy) of ``model``'s head ``task`` on ``split``."""
    model.eval()
    loss = correct = 0.0
    for x, y in batches(split, 512, device):
        logits = model(x, task)
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    return loss / len(split), correct / len(split)


def train_task(model: MultiHeadNet, optimizer: torch.optim.Optimizer, task: int, seq: TaskSequence,
               cfg: TrainConfig, device: torch.device, generator: torch.Generator,
               on_epoch: Callable[[int, float, float], None] | None = None) -> int:
    """Train head ``task`` and the trunk: LR divided by ``lr_factor`` after ``lr_patience`` epochs without a better
    validation loss, stop when that would go below ``lr_min`` (or at ``max_epochs``); restore the best weights.
    Returns the number of epochs run."""
    data = seq.tasks[task]
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr
    best_loss, best_state, patience = float("inf"), copy.deepcopy(model.state_dict()), cfg.lr_patience
    lr = cfg.lr
    for epoch in range(1, cfg.max_epochs + 1):
        model.train()
        for x, y in batches(data.train, cfg.batch_size, device, generator):
            optimizer.zero_grad()
            F.cross_entropy(model(x, task), y).backward()
            optimizer.step()
        val_loss, val_acc = evaluate(model, task, data.val, cfg.batch_size, device)
        if on_epoch:
            on_epoch(epoch, val_loss, val_acc)
        if val_loss < best_loss:
            best_loss, best_state, patience = val_loss, copy.deepcopy(model.state_dict()), cfg.lr_patience
            continue
        patience -= 1
        if patience <= 0:
            lr /= cfg.lr_factor
            if lr < cfg.lr_min:
                break
            for group in optimizer.param_groups:
                group["lr"] = lr
            patience = cfg.lr_patience
    model.load_state_dict(best_state)
    return epoch


class Learner:
    """One method's view of the sequence: which model answers for a task, and what happens after each task."""

    def __init__(self, method: str, make_model: Callable[[], MultiHeadNet], device: torch.device,
                 backend: str = "auto") -> None:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
        self.method = method
        self.make_model = make_model
        self.device = device
        self.backend = backend
        self.models: list[MultiHeadNet] = []
        self.spg: SPG | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        if method != "one":
            self._new_model()

    def _new_model(self) -> None:
        model = self.make_model().to(self.device)
        self.models.append(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        if self.method == "spg":
            self.spg = SPG(model, heads=model.heads, backend=self.backend)
            optimizer = self.spg.wrap(optimizer)
        self.optimizer = optimizer

    def start_task(self, task: int) -> tuple[MultiHeadNet, torch.optim.Optimizer]:
        if self.method == "one":
            self._new_model()
        return self.models[-1], self.optimizer

    def model_for(self, task: int) -> MultiHeadNet:
        return self.models[task] if self.method == "one" else self.models[0]

    def end_task(self, task: int, seq: TaskSequence, cfg: TrainConfig) -> float:
        """Seconds spent in SPG's importance pass (0 for the other methods)."""
        if self.spg is None:
            return 0.0
        start = time.perf_counter()
        self.spg.end_task(task, list(batches(seq.tasks[task].train, cfg.batch_size, self.device)))
        return time.perf_counter() - start


def head_sizes(seq: TaskSequence) -> list[int]:
    return [t.n_classes for t in seq.tasks]


def model_factory(backbone: str, seq: TaskSequence, dropout: float) -> Callable[[], nn.Module]:
    from spg_fast.harness.models import build_model

    return lambda: build_model(backbone, seq.input_shape, head_sizes(seq), dropout)
