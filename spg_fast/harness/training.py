"""The training protocol (SGD or another optimizer; learning rate divided on a validation-loss
plateau; early stopping; best weights restored) and the ``Learner`` that runs one of the compared
methods (``spg_fast.harness.methods``) through it."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spg_fast._params import inner_module
from spg_fast.harness import methods
from spg_fast.harness.config import ConfigError, TrainConfig
from spg_fast.harness.health import check_epoch
from spg_fast.harness.methods import Batch, Method, MethodOptions, TaskData
from spg_fast.harness.methods.spg import Spg
from spg_fast.harness.models import MultiHeadNet, build_model
from spg_fast.harness.parallel import Ranks
from spg_fast.harness.sequences import Split, TaskSequence
from spg_fast.spg import SPG

# The authors' input standardisation (per channel): ImageNet's statistics for colour images, MNIST's
# for grey ones.
NORMALIZATION = {3: ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), 1: ((0.1307,), (0.3081,))}
EVAL_BATCH = 512  # samples per forward and rank when evaluating

EpochLog = Callable[[dict[str, Any]], None]
BatchLog = Callable[[int, int], None]  # (batches done, batches in the epoch)


class Inputs:
    """Turns stored samples into model inputs on ``device``: uint8 images scaled to [0, 1], then
    (``normalize``) standardised per channel. Over several processes (``ranks``) each rank gets its
    share of every batch."""

    def __init__(
        self, seq: TaskSequence, cfg: TrainConfig, device: torch.device, ranks: Ranks | None = None
    ) -> None:
        self.device = device
        self.ranks = ranks or Ranks(device=device)
        self.stats: tuple[Tensor, Tensor] | None = None
        if cfg.normalize:
            channels = seq.input_shape[0] if len(seq.input_shape) == 3 else None
            if channels not in NORMALIZATION:
                raise ConfigError(
                    "normalize",
                    f"defined for grey or colour images, not inputs of shape {seq.input_shape}",
                )
            mean, std = (
                torch.tensor(v, device=device).view(-1, 1, 1) for v in NORMALIZATION[channels]
            )
            self.stats = (mean, std)

    def __call__(self, x: Tensor) -> Tensor:
        x = x.to(self.device)
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        return (x - self.stats[0]) / self.stats[1] if self.stats else x

    def shares(
        self, split: Split, batch_size: int, order: Tensor | None = None
    ) -> Iterator[tuple[Tensor, Tensor, float]]:
        """This rank's share (x, y) of each mini-batch of ``split`` in ``order`` (stored order
        without), and the batch's size over the number of ranks: dividing the share's summed loss by
        it, the ranks' averaged gradients are the whole batch's mean gradient (one process: the
        share is the batch, the loss its mean)."""
        order = torch.arange(len(split)) if order is None else order
        for idx in order.split(batch_size):
            mine = self.ranks.share(idx)
            yield self(split.x[mine]), split.y[mine].to(self.device), len(idx) / self.ranks.world

    def batches(
        self, split: Split, batch_size: int, order: Tensor | None = None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's share (x, y) of each mini-batch, as ``shares``."""
        for x, y, _ in self.shares(split, batch_size, order):
            yield x, y


@torch.no_grad()
def evaluate(model: nn.Module, task: int, split: Split, inputs: Inputs) -> tuple[float, float]:
    """(mean loss, accuracy) of ``model``'s head ``task`` on ``split``. Over several processes each
    rank evaluates its share of every batch (a DDP model through its inner module, an FSDP2 one in
    step with the other ranks) and the sums are added up: every rank gets the same numbers."""
    model.eval()
    net = inner_module(model)
    loss = correct = 0.0
    for x, y, _ in inputs.shares(split, EVAL_BATCH * inputs.ranks.world):
        logits = net(x, task)
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    loss, correct = inputs.ranks.sum([loss, correct])
    return loss / len(split), correct / len(split)


class _DivideStop:
    """Divide the LR by ``lr_factor`` after ``lr_patience`` epochs without a lower validation loss;
    stop when it would fall below ``lr_min``."""

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
    """The authors' rule: torch's ReduceLROnPlateau (factor 1/``lr_factor``, down to ``lr_min``) and
    a stop after ``lr_patience`` epochs without a lower validation loss at ``lr_min``."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> None:
        self.cfg, self.optimizer, self.waited = cfg, optimizer, 0
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer,
            mode="min",
            factor=1 / cfg.lr_factor,
            patience=cfg.lr_patience - 1,
            min_lr=cfg.lr_min,
        )

    def stop_after(self, improved: bool, val_loss: float) -> bool:
        at_min = self.optimizer.param_groups[0]["lr"] <= self.cfg.lr_min
        self.waited = 0 if improved or not at_min else self.waited + 1
        if self.waited >= self.cfg.lr_patience:
            return True
        self.scheduler.step(val_loss)
        return False


SCHEDULERS = {"divide-stop": _DivideStop, "plateau": _Plateau}


def train_task(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    task: int,
    seq: TaskSequence,
    cfg: TrainConfig,
    inputs: Inputs,
    generator: torch.Generator,
    on_epoch: EpochLog | None = None,
    *,
    method: Method | None = None,
    on_batch: BatchLog | None = None,
) -> int:
    """Train head ``task`` and the trunk with ``method``'s loss and step hooks (fine-tuning without
    one) under ``cfg.schedule`` and restore the weights of the epoch with the lowest validation
    loss (a non-finite validation loss also restores them, as the authors' code does). Returns the
    number of epochs run. A non-finite training loss or weight raises ``DivergedError`` at the end
    of its epoch. ``model`` may be wrapped for several processes (``inputs.ranks``): every rank
    then trains on its share of each batch, and all take the same validation decisions.
    ``on_batch`` is called after every step."""
    method = method or Method()
    data = seq.tasks[task]
    schedule = SCHEDULERS[cfg.schedule](optimizer, cfg)
    heads = list(inner_module(model).heads.parameters())
    best_loss, best_state = math.inf, copy.deepcopy(model.state_dict())
    order = torch.randperm(len(data.train), generator=generator) if cfg.shuffle == "once" else None
    steps = -(-len(data.train) // cfg.batch_size)
    for epoch in range(1, cfg.max_epochs + 1):
        start = time.perf_counter()
        model.train()
        total = torch.zeros((), device=inputs.device)
        epoch_order = (
            order if order is not None else torch.randperm(len(data.train), generator=generator)
        )
        shares = inputs.shares(data.train, cfg.batch_size, epoch_order)
        for step, (x, y, per_rank) in enumerate(shares):
            batch = Batch(x, y, task, per_rank, step * cfg.batch_size / len(data.train))
            optimizer.zero_grad()
            loss = method.loss(model, batch)
            loss.backward()
            method.before_step(model, batch)
            if cfg.clip_heads:
                nn.utils.clip_grad_norm_(heads, cfg.clip_heads)
            optimizer.step()
            method.after_step(model, batch)
            total += loss.detach() * per_rank
            if on_batch is not None:
                on_batch(step + 1, steps)
        inputs.ranks.sync_buffers(model)
        train_loss = inputs.ranks.sum([total.item()])[0] / len(data.train)
        check_epoch(model, task, epoch, train_loss, inputs.ranks)
        val_loss, val_acc = evaluate(model, task, data.val, inputs)
        improved = val_loss < best_loss
        if improved:
            best_loss, best_state = val_loss, copy.deepcopy(model.state_dict())
        elif not math.isfinite(val_loss):
            model.load_state_dict(best_state)
        if on_epoch:
            on_epoch(
                {
                    "task": task,
                    "epoch": epoch,
                    "train_loss": train_loss,
                    "val_loss": val_loss,
                    "val_acc": val_acc,
                    "lr": optimizer.param_groups[0]["lr"],
                    "seconds": time.perf_counter() - start,
                    "restored": not improved and not math.isfinite(val_loss),
                }
            )
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
    return {
        name: buf.clone()
        for name, buf in model.named_buffers()
        if isinstance(model.get_submodule(name.rpartition(".")[0]), nn.modules.batchnorm._BatchNorm)
    }


def _load_buffers(model: nn.Module, buffers: dict[str, Tensor]) -> None:
    named = dict(model.named_buffers())
    for name, value in buffers.items():
        named[name].copy_(value)


class Learner:
    """One method's view of the sequence: which network answers for a task, and what happens
    around training and after each task (``method``, see ``spg_fast.harness.methods``).

    ``one`` trains a fresh network per task, the other methods one network. Every task gets a fresh
    optimizer (as in the authors' code), passed through the method (SPG wraps it). With
    ``cfg.bn_stats == "per-task"`` the BatchNorm statistics are stored at each task's end and
    swapped in to evaluate that task. Over several processes (``ranks``) each network is trained
    wrapped (DDP or FSDP2); ``models`` holds the networks themselves, whose parameter names and
    checkpoints are those of one process."""

    def __init__(
        self,
        method: str,
        make_model: Callable[[], MultiHeadNet],
        device: torch.device,
        cfg: TrainConfig,
        backend: str = "auto",
        ranks: Ranks | None = None,
        options: MethodOptions | None = None,
    ) -> None:
        self.method = methods.make(method, options or MethodOptions(), backend)
        self.make_model, self.device, self.cfg = make_model, device, cfg
        self.ranks = ranks or Ranks(device=device)
        if self.method.one_process and self.ranks.world > 1:
            raise ConfigError(
                "method",
                f"{method} runs in one process, not {self.ranks.world} (torchrun, --nproc)",
            )
        self.models: list[nn.Module] = []
        self.wrapped: list[nn.Module] = []
        self.bn_stats: list[dict[str, Tensor]] = []
        if not self.method.network_per_task:
            self.method.bind(self._new_model())

    @property
    def spg(self) -> SPG | None:
        """The SPG object of the ``spg`` method, else None."""
        return self.method.spg if isinstance(self.method, Spg) else None

    def _new_model(self) -> nn.Module:
        model = self.method.network(self.make_model()).to(self.device)
        self.models.append(model)
        self.wrapped.append(self.ranks.wrap(model))
        return self.wrapped[-1]

    def start_task(self, task: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        model = self._new_model() if self.method.network_per_task else self.wrapped[0]
        optimizer = self.method.optimizer(make_optimizer(self.cfg.optimizer, model.parameters()))
        for group in optimizer.param_groups:
            group["lr"] = self.cfg.lr
        return model, optimizer

    def model_for(self, task: int) -> nn.Module:
        """The (wrapped) network that answers for ``task``."""
        return self.wrapped[task] if self.method.network_per_task else self.wrapped[0]

    def end_task(
        self,
        task: int,
        seq: TaskSequence,
        inputs: Inputs,
        report: methods.base.PassReport | None = None,
    ) -> float:
        """Store the task's BatchNorm statistics (per-task) and run the method's pass over the
        task's training data (SPG's importance, EWC's Fisher diagonal); returns the seconds it
        took. The pass may run the model in train mode; the BatchNorm statistics are kept as
        training left them. ``report`` is called after every batch of the pass."""
        model = inner_module(self.model_for(task))
        if self.cfg.bn_stats == "per-task":
            self.bn_stats.append(_bn_buffers(model))
        kept = _bn_buffers(model)
        train = seq.tasks[task].train
        data = TaskData(
            task,
            len(train),
            self.cfg.batch_size,
            lambda size: inputs.shares(train, size),
        )
        start = time.perf_counter()
        self.method.end_task(self.model_for(task), data, report)
        _load_buffers(model, kept)
        return time.perf_counter() - start

    def usage(self) -> dict[str, Any] | None:
        """The method's capacity measure after the tasks so far (None if it has none)."""
        return self.method.usage()

    def test(self, task: int, seq: TaskSequence, inputs: Inputs) -> float:
        """Test accuracy on ``task`` (with that task's BatchNorm statistics when they are
        per task)."""
        model = self.model_for(task)
        net = inner_module(model)
        if not self.bn_stats:
            return evaluate(model, task, seq.tasks[task].test, inputs)[1]
        current = _bn_buffers(net)
        _load_buffers(net, self.bn_stats[task])
        try:
            return evaluate(model, task, seq.tasks[task].test, inputs)[1]
        finally:
            _load_buffers(net, current)

    def state_dict(self) -> dict[str, Any]:
        """The networks (whole tensors, also when sharded: every rank must call this), the BatchNorm
        statistics and the method's state."""
        full = self.ranks.full
        return {
            "models": [full(m.state_dict()) for m in self.models],
            "bn_stats": self.bn_stats,
            "method": full(self.method.state_dict()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        while len(self.models) < len(state["models"]):
            self._new_model()
        for model, saved in zip(self.models, state["models"], strict=True):
            model.load_state_dict(self.ranks.sharded_like(model, saved))
        self.bn_stats = state["bn_stats"]
        self.method.load_state_dict(state["method"])


def model_factory(backbone: str, seq: TaskSequence, cfg: TrainConfig) -> Callable[[], MultiHeadNet]:
    heads = [t.n_classes for t in seq.tasks]
    return lambda: build_model(
        backbone, seq.input_shape, heads, cfg.dropout_conv, cfg.dropout_fc, seq.image_shape
    )
