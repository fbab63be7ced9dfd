"""SPG in the Hugging Face ``Trainer``: a callback that masks every optimizer step, ends a task
after each ``train()`` (on one process or under DDP: torchrun, accelerate launch) and keeps SPG's
state in every checkpoint folder, the last one of a task included."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from spg_fast.integrations.base import (
    MaskedOptimizers,
    TaskRun,
    check_model_holds,
    checked_end_task_options,
    checkpoint_state,
    data_parallel_group,
    end_current_task,
    read_checkpoint_state,
)
from spg_fast.mask_mode import MaskMode
from spg_fast.spg import SPG

try:
    from accelerate.state import AcceleratorState, is_initialized
    from accelerate.utils import DistributedType
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "spg_fast.integrations.transformers needs transformers and accelerate: "
        "pip install 'spg-fast[transformers]'"
    ) from err

_WHERE = "spg_fast.integrations.transformers.SPGCallback"

STATE_FILE = "spg_state.pt"
"""The file, in each of the Trainer's ``checkpoint-<step>`` folders, that holds SPG's state at
that step."""


class SPGCallback(TrainerCallback):
    """Run SPG inside ``transformers.Trainer.train``: one ``train()`` call is one task.

    - Masking: when training begins, the Trainer's optimizer (unwrapped from Accelerate) gets
      ``spg.attach(optimizer, mask=mask)``: its ``step()`` applies SPG's mask in the mode
      ``spg_fast.mask_mode`` picks per param group (``mask="auto"``: the update mask for the
      Trainer's default AdamW, which gradient masking would not protect), after gradient clipping.
      An optimizer already masked through ``spg.wrap``, ``spg.attach`` or ``spg_fast.optim`` is
      refused.
    - End of task: when training finishes, ``spg.end_task`` runs for task ``spg.tasks_finished``
      over the Trainer's train dataloader (its batches are already on the model's device).
      ``end_task_options`` are passed to it; those not given default to the model's own loss, as the
      Trainer computes it: ``prepare_batch`` gives ``(batch, None)``, ``forward`` returns
      ``model(**batch).loss`` and ``loss_fn`` returns that loss.
    - Several processes (``torchrun`` or ``accelerate launch``: DDP): build SPG on the plain model,
      as on one process. Each process measures its share of the data (Accelerate's sharded
      dataloader) and the gradient sums are added over the processes, so every process ends the
      task with the importance of all the data. FSDP and DeepSpeed are refused when training
      begins.
    - Checkpoints: every checkpoint folder the Trainer writes gets ``spg_state.pt``
      (``{"global_step", **spg_fast.integrations.base.checkpoint_state(...)}``);
      ``train(resume_from_checkpoint=...)`` restores it. The folder resumed from is
      ``args.resume_from_checkpoint`` when set, else ``<output_dir>/checkpoint-<step>`` (what
      ``resume_from_checkpoint`` points at for the Trainer's own checkpoints); a missing file, or
      one saved at another step, is an error. Once the task has ended, the file in the folder of
      the last step (and in the best model's folder under ``load_best_model_at_end``) is written
      again with the task's importance: a run that resumes from it and trains further trains the
      next task, protected. A run that resumes from it and trains nothing ends nothing; one that
      resumes from any other checkpoint and trains nothing ends the task (a run that stopped
      before ``end_task``). One that would train on from a checkpoint written after training was
      over but before the task ended is refused before its first step.

    Args:
        spg: the SPG object of the model the Trainer trains.
        mask: ``"auto"`` (the default), ``"gradient"`` or ``"update"`` (``spg_fast.mask_mode``).
        **end_task_options: keyword arguments for ``spg.end_task`` (not the task id or loader).
    """

    def __init__(self, spg: SPG, *, mask: MaskMode = "auto", **end_task_options: Any) -> None:
        self.spg = spg
        self.end_task_options = checked_end_task_options(spg, end_task_options, _WHERE)
        self._optimizers = MaskedOptimizers(spg, mask)
        self._run = TaskRun(spg, _WHERE)
        self._resumed_from: str | None = None

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        **kwargs: Any,
    ) -> None:
        _check_backend(args)
        check_model_holds(self.spg, model, _WHERE)
        self._run = TaskRun(self.spg, _WHERE)
        self._resumed_from = None
        if state.global_step > 0:  # the Trainer resumed from a checkpoint
            self._restore(args, state)
        self._optimizers.add(optimizer)

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._run.before_training()

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not args.should_save:
            return
        folder = _checkpoint_folder(args, state)
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"{_WHERE}: the Trainer saved step {state.global_step}, but {folder} is not a "
                "folder (a hyperparameter search saves elsewhere), so SPG's state has nowhere "
                "to go"
            )
        over = bool(control.should_training_stop) or state.global_step >= state.max_steps
        self._write(folder, state.global_step, over=over)

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        train_dataloader: Any = None,
        **kwargs: Any,
    ) -> None:
        self._optimizers.release()
        if not self._run.should_end():
            return
        if train_dataloader is None:
            raise RuntimeError(
                f"{_WHERE}: the Trainer passed no train dataloader, so task "
                f"{self.spg.tasks_finished} cannot be measured"
            )
        options = {
            "prepare_batch": _whole_batch,
            "forward": _model_loss(model),
            "loss_fn": _the_loss,
            **self.end_task_options,
        }
        end_current_task(self.spg, train_dataloader, options, data_parallel_group(args.world_size))
        self._run.ended = True
        if args.should_save:
            self._write_again(args, state)

    def _write(self, folder: str, step: int, *, over: bool) -> None:
        state = checkpoint_state(self.spg, ended=self._run.ended, over=over)
        torch.save({"global_step": step, **state}, os.path.join(folder, STATE_FILE))

    def _write_again(self, args: TrainingArguments, state: TrainerState) -> None:
        """The task has ended: the checkpoints of this step (and the best model's, which the
        Trainer has just loaded) get SPG's state with it."""
        folders = {_checkpoint_folder(args, state): state.global_step}
        if self._resumed_from is not None:
            folders[self._resumed_from] = state.global_step
        best = state.best_model_checkpoint
        if args.load_best_model_at_end and best:
            folders[best] = int(os.path.basename(os.path.normpath(best)).rsplit("-", 1)[-1])
        for folder, step in folders.items():
            if os.path.isfile(os.path.join(folder, STATE_FILE)):
                self._write(folder, step, over=True)

    def _restore(self, args: TrainingArguments, state: TrainerState) -> None:
        folder = args.resume_from_checkpoint or _checkpoint_folder(args, state)
        path = os.path.join(folder, STATE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{_WHERE}: the Trainer resumed at step {state.global_step} but {path} does not "
                "exist: resume from a checkpoint saved with this callback (set "
                "args.resume_from_checkpoint to its folder if it is outside output_dir)"
            )
        saved = torch.load(path, map_location="cpu", weights_only=True)
        step = saved.pop("global_step", None)
        if step != state.global_step:
            raise ValueError(
                f"{_WHERE}: {path} holds SPG's state at step {step}, but the Trainer resumed at "
                f"step {state.global_step}"
            )
        spg_state, self._run.resumed = read_checkpoint_state(saved, _WHERE)
        self.spg.load_state_dict(spg_state)
        self._resumed_from = folder


def _check_backend(args: TrainingArguments) -> None:
    """Refuse the Accelerate back-ends SPG cannot mask under."""
    kind = AcceleratorState().distributed_type if is_initialized() else None
    if args.deepspeed or kind == DistributedType.DEEPSPEED:
        raise RuntimeError(
            f"{_WHERE}: DeepSpeed runs the optimizer step inside backward on its own partitioned "
            "copies of the parameters, where SPG's mask cannot reach it; train with DDP (torchrun "
            "or accelerate launch without a DeepSpeed config)"
        )
    if kind == DistributedType.FSDP:  # args.fsdp alone: on the CPU Accelerate runs DDP instead
        raise RuntimeError(
            f"{_WHERE}: FSDP under the Trainer replaces the parameters SPG was built on; train "
            "with DDP (torchrun or accelerate launch without an FSDP config)"
        )


def _checkpoint_folder(args: TrainingArguments, state: TrainerState) -> str:
    return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")


def _whole_batch(batch: Any) -> tuple[Any, None]:
    return batch, None


def _model_loss(model: nn.Module) -> Callable[..., Tensor]:
    def forward(batch: Mapping[str, Any], *_head: int) -> Tensor:
        outputs = model(**batch)
        loss = (
            outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
        )
        if loss is None:
            raise ValueError(
                f"{_WHERE}: the model returned no loss for a training batch; the default "
                "importance pass uses the model's own loss (batches with labels), or pass forward, "
                "loss_fn and prepare_batch"
            )
        return loss

    return forward


def _the_loss(loss: Tensor, _target: Any) -> Tensor:
    return loss
