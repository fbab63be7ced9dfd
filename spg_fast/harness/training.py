"""The training protocol (SGD or another optimizer; learning rate divided on a validation-loss plateau; early
stopping; best weights restored) and the methods it compares: ``spg`` (through the public integration, as a user
writes it), ``finetune`` and ``one``."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spg_fast.harness.config import ConfigError, TrainConfig
from spg_fast.harness.models import MultiHeadNet, build_model
from spg_fast.harness.sequences import Split, TaskSequence
from spg_fast.spg import SPG

METHODS = ("spg", "finetune", "one")

# The authors' input standardisation (per channel): ImageNet's statistics for colour images, MNIST's for grey ones.
NORMALIZATION = {3: ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), 1: ((0.1307,), (0.3081,))}

EpochLog = Callable[[dict[str, Any]], None]


class Inputs:
    """Turns stored samples into model inputs on ``device``: uint8 images scaled to [0, 1], then (``normalize``)
    standardised per channel."""

    def __init__(self, seq: TaskSequence, cfg: TrainConfig, device: torch.device) -> None:
        self.device = device
        self.stats: tuple[Tensor, Tensor] | None = None
        if cfg.normalize:
            channels = seq.input_shape[0] if len(seq.input_shape) == 3 else None
            if channels not in NORMALIZATION:
                raise ConfigError("normalize", f"defined for grey or colour images, not inputs of shape "
                                  f"{seq.input_shape}")
            mean, std = (torch.tensor(v, device=device).view(-1, 1, 1) for v in NORMALIZATION[channels])
            self.stats = (mean, std)

    def __call__(self, x: Tensor) -> Tensor:
        x = x.to(self.device)
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        return (x - self.stats[0]) / self.stats[1] if self.stats else x

    def batches(self, split: Split, batch_size: int, order: Tensor | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """Mini-batches of ``split`` in ``order`` (stored order without)."""
        order = torch.arange(len(split)) if order is None else order
        for idx in order.split(batch_size):
            yield self(split.x[idx]), split.y[idx].to(self.device)


@torch.no_grad()
def evaluate(model: MultiHeadNet, task: int, split: Split, inputs: Inputs) -> tuple[float, float]:
    """(mean loss, accuracy) of ``model``'s head ``task`` on ``split``."""
    model.eval()
    loss = correct = 0.0
    for x, y in inputs.batches(split, 512):
        logits = model(x, task)
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    return loss / len(split), correct / len(split)


class _DivideStop:
    """Divide the LR by ``lr_factor`` after ``lr_patience`` epochs without a lower validation loss; stop when it
    would fall below ``lr_min``."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> None:
        self.optimizer, self.cfg, self.patience, self.lr = optimizer, cfg, cfg.lr_patience, cfg.lr

    def stop_after(self, improved: bool, val_loss: float) -> bool:
        if improved:
            self.patience = self.cfg.lr_patience
            return False
        self.patience -= 1
        if self.patience > 0:
            return False
        self.lr /= self.cfg.lr_factor
        if self.lr < self.cfg.lr_min:
            return True
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        self.patience = self.cfg.lr_patience
        return False


class _Plateau:
    """The authors' rule: torch's ReduceLROnPlateau (factor 1/``lr_factor``, down to ``lr_min``) and a stop after
    ``lr_patience`` epochs without a lower validation loss at ``lr_min``."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> None:
        self.cfg, self.optimizer, self.waited = cfg, optimizer, 0
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=1 / cfg.lr_factor, patience=cfg.lr_patience - 1, min_lr=cfg.lr_min)

    def stop_after(self, improved: bool, val_loss: float) -> bool:
        at_min = self.optimizer.param_groups[0]["lr"] <= self.cfg.lr_min
        self.waited = 0 if improved or not at_min else self.waited + 1
        if self.waited >= self.cfg.lr_patience:
            return True
        self.scheduler.step(val_loss)
        return False


SCHEDULERS = {"divide-stop": _DivideStop, "plateau": _Plateau}


def train_task(model: MultiHeadNet, optimizer: torch.optim.Optimizer, task: int, seq: TaskSequence,
               cfg: TrainConfig, inputs: Inputs, generator: torch.Generator, on_epoch: EpochLog | None = None
               ) -> int:
    """Train head ``task`` and the trunk under ``cfg.schedule`` and restore the weights of the epoch with the
    lowest validation loss (a non-finite validation loss also restores them, as the authors' code does). Returns
    the number of epochs run."""
    data = seq.tasks[task]
    schedule = SCHEDULERS[cfg.schedule](optimizer, cfg)
    heads = list(model.heads.parameters())
    best_loss, best_state = math.inf, copy.deepcopy(model.state_dict())
    order = torch.randperm(len(data.train), generator=generator) if cfg.shuffle == "once" else None
    for epoch in range(1, cfg.max_epochs + 1):
        start = time.perf_counter()
        model.train()
        total = torch.zeros((), device=inputs.device)
        epoch_order = order if order is not None else torch.randperm(len(data.train), generator=generator)
        for x, y in inputs.batches(data.train, cfg.batch_size, epoch_order):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x, task), y)
            loss.backward()
            if cfg.clip_heads:
                nn.utils.clip_grad_norm_(heads, cfg.clip_heads)
            optimizer.step()
            total += loss.detach() * len(y)
        val_loss, val_acc = evaluate(model, task, data.val, inputs)
        improved = val_loss < best_loss
        if improved:
            best_loss, best_state = val_loss, copy.deepcopy(model.state_dict())
        elif not math.isfinite(val_loss):
            model.load_state_dict(best_state)
        if on_epoch:
            on_epoch({"task": task, "epoch": epoch, "train_loss": total.item() / len(data.train),
                      "val_loss": val_loss, "val_acc": val_acc, "lr": optimizer.param_groups[0]["lr"],
                      "seconds": time.perf_counter() - start, "restored": not improved and
                      not math.isfinite(val_loss)})
        if schedule.stop_after(improved, val_loss):
            break
    model.load_state_dict(best_state)
    return epoch


def make_optimizer(name: str, params: Any) -> torch.optim.Optimizer:
    """A torch optimizer (learning rate set per task by the protocol)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.0)
    if name == "sgd-momentum":
        return torch.optim.SGD(params, lr=0.0, momentum=0.9)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=0.0)
    raise ValueError(f"unknown optimizer {name!r}")


def _bn_buffers(model: nn.Module) -> dict[str, Tensor]:
    return {name: buf.clone() for name, buf in model.named_buffers()
            if isinstance(model.get_submodule(name.rpartition(".")[0]), nn.modules.batchnorm._BatchNorm)}


def _load_buffers(model: nn.Module, buffers: dict[str, Tensor]) -> None:
    named = dict(model.named_buffers())
    for name, value in buffers.items():
        named[name].copy_(value)


class Learner:
    """One method's view of the sequence: which model answers for a task, and what happens after each task.

    ``spg`` and ``finetune`` train one network; ``one`` a new one per task. Every task gets a fresh optimizer (as
    in the authors' code), wrapped with ``spg.wrap`` for ``spg``. With ``cfg.bn_stats == "per-task"`` the
    BatchNorm statistics are stored at each task's end and swapped in to evaluate that task."""

    def __init__(self, method: str, make_model: Callable[[], MultiHeadNet], device: torch.device, cfg: TrainConfig,
                 backend: str = "auto") -> None:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
        self.method, self.make_model, self.device, self.cfg = method, make_model, device, cfg
        self.models: list[MultiHeadNet] = []
        self.spg: SPG | None = None
        self.bn_stats: list[dict[str, Tensor]] = []
        if method != "one":
            self._new_model()
            if method == "spg":
                self.spg = SPG(self.models[0], heads=self.models[0].heads, backend=backend)

    def _new_model(self) -> MultiHeadNet:
        model = self.make_model().to(self.device)
        self.models.append(model)
        return model

    def start_task(self, task: int) -> tuple[MultiHeadNet, torch.optim.Optimizer]:
        model = self._new_model() if self.method == "one" else self.models[0]
        optimizer = make_optimizer(self.cfg.optimizer, model.parameters())
        if self.spg is not None:
            optimizer = self.spg.wrap(optimizer)
        for group in optimizer.param_groups:
            group["lr"] = self.cfg.lr
        return model, optimizer

    def model_for(self, task: int) -> MultiHeadNet:
        return self.models[task] if self.method == "one" else self.models[0]

    def end_task(self, task: int, seq: TaskSequence, inputs: Inputs) -> float:
        """Store the task's BatchNorm statistics (per-task) and run SPG's importance pass; returns the seconds the
        pass took (0 for the other methods). The pass runs the model in train mode; the BatchNorm statistics are
        kept as training left them."""
        model = self.model_for(task)
        if self.cfg.bn_stats == "per-task":
            self.bn_stats.append(_bn_buffers(model))
        if self.spg is None:
            return 0.0
        kept = _bn_buffers(model)
        start = time.perf_counter()
        self.spg.end_task(task, list(inputs.batches(seq.tasks[task].train, self.cfg.batch_size)))
        _load_buffers(model, kept)
        return time.perf_counter() - start

    def test(self, task: int, seq: TaskSequence, inputs: Inputs) -> float:
        """Test accuracy on ``task`` (with that task's BatchNorm statistics when they are per task)."""
        model = self.model_for(task)
        if not self.bn_stats:
            return evaluate(model, task, seq.tasks[task].test, inputs)[1]
        current = _bn_buffers(model)
        _load_buffers(model, self.bn_stats[task])
        try:
            return evaluate(model, task, seq.tasks[task].test, inputs)[1]
        finally:
            _load_buffers(model, current)

    def state_dict(self) -> dict[str, Any]:
        return {"models": [m.state_dict() for m in self.models], "bn_stats": self.bn_stats,
                "spg": self.spg.state_dict() if self.spg else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        while len(self.models) < len(state["models"]):
            self._new_model()
        for model, saved in zip(self.models, state["models"], strict=True):
            model.load_state_dict(saved)
        self.bn_stats = state["bn_stats"]
        if self.spg is not None:
            self.spg.load_state_dict(state["spg"])


def model_factory(backbone: str, seq: TaskSequence, cfg: TrainConfig) -> Callable[[], MultiHeadNet]:
    heads = [t.n_classes for t in seq.tasks]
    return lambda: build_model(backbone, seq.input_shape, heads, cfg.dropout_conv, cfg.dropout_fc, seq.image_shape)
