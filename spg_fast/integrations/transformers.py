"""SPG in the Hugging Face ``Trainer``: a callback that masks gradients right before each optimizer
step, ends a task after each ``train()`` and keeps SPG's state in every checkpoint folder."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from spg_fast.integrations.base import (
    MaskedOptimizers,
    check_model_holds,
    checked_end_task_options,
    end_current_task,
    refuse_multiprocess,
)
from spg_fast.mask_mode import MaskMode
from spg_fast.spg import SPG

try:
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
    - Checkpoints: every checkpoint folder the Trainer writes gets ``spg_state.pt``
      (``spg.state_dict()`` and the step); ``train(resume_from_checkpoint=...)`` restores it. The
      folder resumed from is ``args.resume_from_checkpoint`` when set, else
      ``<output_dir>/checkpoint-<step>`` (what ``resume_from_checkpoint`` points at for the
      Trainer's own checkpoints); a missing or mismatched file is an error.

    One training process only (a distributed run is refused).
    """

    def __init__(self, spg: SPG, *, mask: MaskMode = "auto", **end_task_options: Any) -> None:
        self.spg = spg
        self.end_task_options = checked_end_task_options(spg, end_task_options, _WHERE)
        self._optimizers = MaskedOptimizers(spg, mask)

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        **kwargs: Any,
    ) -> None:
        refuse_multiprocess(args.world_size, _WHERE)
        check_model_holds(self.spg, model, _WHERE)
        if state.global_step > 0:  # the Trainer resumed from a checkpoint
            self._restore(args, state)
        self._optimizers.add(optimizer)

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
        torch.save(
            {"global_step": state.global_step, "spg": self.spg.state_dict()},
            os.path.join(folder, STATE_FILE),
        )

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
        end_current_task(self.spg, train_dataloader, options)

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
        if saved.get("global_step") != state.global_step:
            raise ValueError(
                f"{_WHERE}: {path} holds SPG's state at step {saved.get('global_step')}, but the "
                f"Trainer resumed at step {state.global_step}"
            )
        self.spg.load_state_dict(saved["spg"])


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
