"""SPG in Lightning: a callback that masks every optimizer step, ends a task when each ``fit``'s
training is over (on one process or under DDP) and keeps SPG's state in Lightning's checkpoints,
the last checkpoint of a task included."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from spg_fast.integrations.base import (
    MaskedOptimizers,
    TaskRun,
    check_model_holds,
    checked_end_task_options,
    checkpoint_state,
    end_current_task,
    read_checkpoint_state,
)
from spg_fast.mask_mode import MaskMode, check_mask
from spg_fast.spg import SPG

try:
    import lightning.pytorch as pl
    from lightning.fabric.utilities.cloud_io import get_filesystem
    from lightning.pytorch.strategies import (
        DDPStrategy,
        DeepSpeedStrategy,
        FSDPStrategy,
        ModelParallelStrategy,
        SingleDeviceStrategy,
    )
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "spg_fast.integrations.lightning needs the lightning package: "
        "pip install 'spg-fast[lightning]'"
    ) from err

_WHERE = "spg_fast.integrations.lightning.SPGCallback"


class SPGCallback(pl.Callback):
    """Run SPG inside ``lightning.Trainer.fit``: one ``fit`` is one task.

    - Masking: when the fit starts, every optimizer of the trainer gets ``spg.attach(optimizer,
      mask=mask)``: its ``step()`` applies SPG's mask in the mode ``spg_fast.mask_mode`` picks per
      param group (``mask="auto"``: the paper's gradient mask for SGD without weight decay, the
      update mask for AdamW and everything else), wherever Lightning steps it (after gradient
      clipping and, with 16-bit AMP, after unscaling). An optimizer already masked through
      ``spg.wrap``, ``spg.attach`` or ``spg_fast.optim`` is refused when the fit starts, as is one
      holding parameters that are not the SPG model's.
    - End of task: when the fit's training is over (``on_train_end``; not when it fails or is
      interrupted), ``spg.end_task`` runs for task ``spg.tasks_finished`` over the fit's train
      dataloader, on the device the model trained on. ``end_task_options`` (``forward``,
      ``loss_fn``, ``prepare_batch``, ...) are passed to it unchanged; by default each batch is an
      ``(x, y)`` pair and the loss is ``F.cross_entropy(spg.model(x, task_id), y)``.
    - Several processes (``strategy="ddp"`` and its spawn/fork variants): build SPG on the plain
      model (the LightningModule or a submodule), as on one process. Each process measures its
      own share of the data (Lightning's distributed sampler) and the gradient sums are added over
      the DDP group, so every process ends the task with the importance of all the data.
    - FSDP2 (``ModelParallelStrategy`` with a tensor-parallel size of 1, the model sharded with
      ``fully_shard`` in ``configure_model``): pass a function that builds SPG instead of SPG
      (``SPGCallback(lambda module: SPG(module.net, heads="heads"))``); it is called once, when
      the first fit starts, after ``configure_model`` sharded the model (SPG is built on the
      sharded parameters), and ``spg`` is the SPG it built. ``configure_model`` must leave an
      already sharded model as it is (later fits call it again). Each process measures its share
      of the data and ends the task with the importance of all of it, as under DDP.
      Lightning's ``"fsdp"`` strategy (FSDP1's flat parameters), tensor parallelism and DeepSpeed
      are refused when the fit starts.
    - Checkpoints: every Lightning checkpoint holds SPG's state under
      ``checkpoint["callbacks"]["SPGCallback"]`` (``spg_fast.integrations.base.checkpoint_state``)
      and ``fit(ckpt_path=...)`` restores it. Checkpoints written at the step where training ended
      are written again after ``end_task``, so the last checkpoint of a task holds that task's
      importance: a fit that resumes from it and trains further trains the next task, protected.
      A fit that resumes from it and trains nothing ends nothing; one that resumes from any other
      checkpoint and trains nothing ends the task (a run that stopped before ``end_task``). One that
      would train on from a checkpoint written after training was over but before the task ended
      is refused before its first step.

    Args:
        spg: the SPG object of the model the LightningModule trains, or (needed under FSDP2) a
            function that builds it from the LightningModule when the first fit starts.
        mask: ``"auto"`` (the default), ``"gradient"`` or ``"update"`` (``spg_fast.mask_mode``).
        **end_task_options: keyword arguments for ``spg.end_task`` (not the task id or loader).
    """

    def __init__(
        self,
        spg: SPG | Callable[[pl.LightningModule], SPG],
        *,
        mask: MaskMode = "auto",
        **end_task_options: Any,
    ) -> None:
        self._build: Callable[[pl.LightningModule], SPG] | None = None
        self.spg: SPG | None = None
        self._optimizers: MaskedOptimizers | None = None
        if isinstance(spg, SPG | nn.Module) or not callable(spg):
            self._use(spg, end_task_options, mask)
        else:
            self._build = spg
            check_mask(mask)
            self._options = checked_end_task_options(SPG, end_task_options, _WHERE)
            self._mask = mask
        self._pending: dict[str, Any] | None = None
        self._run: TaskRun | None = None  # the current fit's, or the last one's
        self._trainer: pl.Trainer | None = None  # while a fit runs
        self._saves: _Saves | None = None
        self._fitting = False

    def _use(self, spg: SPG, options: dict[str, Any], mask: MaskMode) -> None:
        self.end_task_options = checked_end_task_options(spg, options, _WHERE)
        self._optimizers = MaskedOptimizers(spg, mask)
        self.spg = spg

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            _check_strategy(trainer, built=self._build is None)
            if self.spg is not None:
                check_model_holds(self.spg, pl_module, _WHERE)
            self._trainer = trainer
            self._saves = _Saves(trainer)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After configure_model and the strategy's setup (an FSDP2 model is sharded by now).
        if self.spg is None:
            self._use(self._build(pl_module), self._options, self._mask)
            check_model_holds(self.spg, pl_module, _WHERE)
        self._run = TaskRun(self.spg, _WHERE)
        # Lightning restores callback state before it moves the model to its device; applied now,
        # SPG's state lands on the parameters' device.
        self._fitting = True
        if self._pending is not None:
            state, self._pending = self._pending, None
            self._restore(state)
        for optimizer in trainer.optimizers:
            self._optimizers.add(optimizer)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._run.before_training()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The training loop is over, the strategy still set up: the model is on its device and,
        # under DDP, wrapped (its group known).
        if not self._run.should_end():
            return
        self._end_task(trainer)
        self._saves.write_again(trainer.global_step)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Reached without on_train_end when Lightning skipped training (a checkpoint resumed from
        # had nothing left to train); the strategy is torn down: the model is on the CPU, unwrapped.
        if not self._run.should_end():
            return
        device, trained_on = pl_module.device, trainer.strategy.root_device
        pl_module.to(trained_on)
        try:
            self._end_task(trainer)
        finally:
            pl_module.to(device)

    def _end_task(self, trainer: pl.Trainer) -> None:
        loader = trainer.train_dataloader
        if loader is None:
            raise RuntimeError(
                f"{_WHERE}: the fit had no train dataloader, so task {self.spg.tasks_finished} "
                "cannot be measured"
            )
        wrapped = trainer.strategy.model
        group = wrapped.process_group if isinstance(wrapped, DistributedDataParallel) else None
        if group is None and trainer.world_size > 1:  # after teardown: DDP's default group
            group = dist.group.WORLD
        end_current_task(self.spg, loader, self.end_task_options, group)
        self._run.ended = True

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._fit_over()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._fit_over()  # Lightning skips the teardown hooks when a fit fails

    def _fit_over(self) -> None:
        if self._optimizers is not None:
            self._optimizers.release()
        if self._saves is not None:
            self._saves.remove()
        self._saves = None
        self._trainer = None
        self._fitting = False

    def state_dict(self) -> dict[str, Any]:
        if self._pending is not None:  # restored, not applied yet: pass it on unchanged
            return self._pending
        ended = self._run is not None and self._run.ended
        over = True if ended else None
        if not ended and self._trainer is not None:
            over = _training_over(self._trainer)
        return checkpoint_state(self.spg, ended=ended, over=over)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._fitting:
            self._restore(state_dict)
        else:  # applied when the fit starts
            self._pending = state_dict

    def _restore(self, state: dict[str, Any]) -> None:
        spg_state, saved = read_checkpoint_state(state, _WHERE)
        self.spg.load_state_dict(spg_state)
        self._run.resumed = saved


def _check_strategy(trainer: pl.Trainer, built: bool) -> None:
    """Refuse the strategies SPG cannot mask or measure under, naming what to use instead
    (``built``: the callback was given SPG itself rather than a function that builds it)."""
    strategy = trainer.strategy
    name = type(strategy).__name__
    if isinstance(strategy, ModelParallelStrategy):
        tensor_parallel = strategy.device_mesh["tensor_parallel"].size()
        if tensor_parallel != 1:
            raise RuntimeError(
                f"{_WHERE}: {name} with a tensor-parallel size of {tensor_parallel}: SPG runs "
                "under FSDP2 on a one-dimensional mesh; use "
                "ModelParallelStrategy(data_parallel_size=<processes>, tensor_parallel_size=1)"
            )
        if built:
            raise RuntimeError(
                f"{_WHERE}: under {name} the model is sharded in configure_model, after this SPG "
                "was built on its unsharded parameters; pass a function that builds SPG from the "
                "LightningModule instead (SPGCallback(lambda module: SPG(module.net, ...))): it "
                "is called once the model is sharded"
            )
        return
    if isinstance(strategy, DeepSpeedStrategy):
        raise RuntimeError(
            f"{_WHERE}: DeepSpeed ({name}) steps its own partitioned copies of the parameters, "
            "which SPG cannot mask; use strategy='ddp'"
        )
    if isinstance(strategy, FSDPStrategy):
        raise RuntimeError(
            f"{_WHERE}: Lightning's strategy 'fsdp' ({name}) is FSDP1, whose flattened "
            "parameters SPG cannot mask; use strategy='ddp'"
        )
    if not isinstance(strategy, DDPStrategy | SingleDeviceStrategy):
        raise RuntimeError(
            f"{_WHERE}: strategy {name} is not supported; SPGCallback runs on one device or "
            "under strategy='ddp' (and its spawn/fork variants)"
        )


def _training_over(trainer: pl.Trainer) -> bool:
    """Whether the fit's training loop stops without another step, judged at a checkpoint save the
    way Lightning's fit loop judges it: the step or epoch limit reached (an epoch counts once its
    last batch ran, also while its validation runs) or a stop requested where it may stop."""
    loop = trainer.fit_loop
    epochs = loop.epoch_progress.current
    done = epochs.processed
    if epochs.processed < epochs.started and loop.epoch_loop.batch_progress.is_last_batch:
        done += 1
    steps = loop.epoch_loop.global_step
    if trainer.max_steps != -1 and steps >= trainer.max_steps:
        return True
    if loop.max_epochs not in (None, -1) and done >= loop.max_epochs:
        return True
    may_stop = done >= (loop.min_epochs or 0) and steps >= (loop.min_steps or 0)
    return bool(trainer.should_stop) and may_stop


class _Saves:
    """The checkpoint files a trainer writes during a fit, with the global step of each, so those
    of the last step can be written again once the task has ended: ``trainer.save_checkpoint``
    (which ``ModelCheckpoint`` and users call) is shadowed on the trainer until ``remove``."""

    def __init__(self, trainer: pl.Trainer) -> None:
        self._trainer = trainer
        self._save = trainer.save_checkpoint
        self._written: dict[str, tuple[int, Any]] = {}
        trainer.save_checkpoint = self._recording_save

    def _recording_save(
        self, filepath: Any, weights_only: bool | None = None, storage_options: Any = None
    ) -> None:
        self._save(filepath, weights_only=weights_only, storage_options=storage_options)
        if weights_only:  # holds no callback state
            self._written.pop(str(filepath), None)
        else:
            self._written[str(filepath)] = (self._trainer.global_step, storage_options)

    def write_again(self, step: int) -> None:
        """Write again, with the state as it is now, every full checkpoint written at ``step`` that
        still exists (every process calls it, as ``save_checkpoint`` requires)."""
        for path, (at, options) in list(self._written.items()):
            exists = get_filesystem(path).exists(path)
            if at == step and self._trainer.strategy.broadcast(exists):
                self._save(path, weights_only=False, storage_options=options)

    def remove(self) -> None:
        """Stop shadowing ``trainer.save_checkpoint``."""
        if self._trainer.__dict__.get("save_checkpoint") == self._recording_save:
            del self._trainer.save_checkpoint
