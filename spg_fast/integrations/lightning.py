"""SPG in Lightning: a callback that masks gradients before each optimizer step, ends a task after
each ``fit`` and keeps SPG's state in Lightning's checkpoints."""

from __future__ import annotations

from typing import Any

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
    import lightning.pytorch as pl
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
    - End of task: when ``fit`` finishes (not when it fails or is interrupted), ``spg.end_task``
      runs for task ``spg.tasks_finished`` over the fit's train dataloader, on the device the model
      trained on. ``end_task_options`` (``forward``, ``loss_fn``, ``prepare_batch``, ...) are passed
      to it unchanged; by default each batch is an ``(x, y)`` pair and the loss is
      ``F.cross_entropy(spg.model(x, task_id), y)``.
    - Checkpoints: ``state_dict``/``load_state_dict`` carry ``spg.state_dict()``, so every
      Lightning checkpoint holds SPG's state and ``fit(ckpt_path=...)`` restores it (once the model
      is on its device).

    One training process only (a distributed run is refused).
    """

    def __init__(self, spg: SPG, *, mask: MaskMode = "auto", **end_task_options: Any) -> None:
        self.spg = spg
        self.end_task_options = checked_end_task_options(spg, end_task_options, _WHERE)
        self._optimizers = MaskedOptimizers(spg, mask)
        self._pending_state: dict[str, Any] | None = None
        self._fitting = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            refuse_multiprocess(trainer.world_size, _WHERE)
            check_model_holds(self.spg, pl_module, _WHERE)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning restores callback state before it moves the model to its device; applied now,
        # SPG's state lands on the parameters' device.
        self._fitting = True
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self.spg.load_state_dict(state)
        for optimizer in trainer.optimizers:
            self._optimizers.add(optimizer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loader = trainer.train_dataloader
        if loader is None:
            raise RuntimeError(
                f"{_WHERE}: the fit had no train dataloader, so task {self.spg.tasks_finished} "
                "cannot be measured"
            )
        # Lightning has already moved the model to the CPU (strategy teardown); measure where
        # it trained.
        device, trained_on = pl_module.device, trainer.strategy.root_device
        pl_module.to(trained_on)
        try:
            end_current_task(self.spg, loader, self.end_task_options)
        finally:
            pl_module.to(device)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._fit_over()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._fit_over()  # Lightning skips the teardown hooks when a fit fails

    def _fit_over(self) -> None:
        self._optimizers.release()
        self._fitting = False

    def state_dict(self) -> dict[str, Any]:
        return self._pending_state if self._pending_state is not None else self.spg.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._fitting:
            self.spg.load_state_dict(state_dict)
        else:
            self._pending_state = state_dict
