"""SPG in Avalanche: a strategy plugin that masks every optimizer step of each experience's
training, ends one task per experience on that experience's data, and travels with the strategy
through Avalanche's checkpoints."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor
from torch.utils.data import DataLoader

from spg_fast.integrations.base import MaskedOptimizers, checked_end_task_options, end_current_task
from spg_fast.mask_mode import MaskMode
from spg_fast.spg import SPG

try:
    from avalanche.core import SupervisedPlugin
    from avalanche.models.utils import avalanche_forward
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "spg_fast.integrations.avalanche needs avalanche-lib: pip install 'spg-fast[avalanche]'"
    ) from err

_WHERE = "spg_fast.integrations.avalanche.SPGPlugin"
STATE_FORMAT = 1


class SPGPlugin(SupervisedPlugin):
    """Run SPG inside an Avalanche strategy: one ``strategy.train(experience)`` is one task.

    - Masking: before each experience's training, the strategy's optimizer gets
      ``spg.attach(optimizer, mask=mask)`` (after Avalanche has adapted the model, e.g. added the
      experience's head, and updated the optimizer), so every ``optimizer.step()`` applies SPG's
      mask in the mode ``spg_fast.mask_mode`` picks per param group (``mask="auto"``: the update
      mask for Adam(W) and SGD with weight decay, the paper's gradient mask for plain SGD); the
      hooks are removed when the experience's training ends.
    - End of task: after each experience's training, ``spg.end_task`` runs for task
      ``spg.tasks_finished`` over the experience's own training data (``experience.dataset`` in
      train mode, batches of ``train_mb_size``; not a replay buffer), each batch's
      ``(x, y, task label)`` giving ``(x, y)``, on the strategy's device.
    - Heads: with per-task heads (``SPG(model, heads=...)``, e.g. the ``classifier`` of a model
      whose classifier is a ``MultiHeadClassifier``; heads Avalanche adds per task are picked
      up), SPG's head ``t`` is the head of the ``t``-th experience's task label, called as
      ``model(x, task_label)``; each experience needs a task label of its own. Without heads
      (``heads=None``) the model is called as Avalanche calls it (``avalanche_forward``).
    - Checkpoints: the plugin, SPG included, is part of the strategy, so
      ``avalanche.checkpointing.save_checkpoint`` / ``maybe_load_checkpoint`` carry it (after
      a load, the strategy holds new plugin and SPG objects: use ``plugin.spg`` of the plugin in
      ``strategy.plugins``). ``state_dict`` / ``load_state_dict`` give the state for a checkpoint
      of your own (``torch.load(weights_only=True)`` reads it).

    Args:
        spg: the SPG object of the strategy's model.
        mask: ``"auto"`` (the default), ``"gradient"`` or ``"update"`` (``spg_fast.mask_mode``).
        **end_task_options: keyword arguments for ``spg.end_task`` (not the task id or loader);
            ``forward`` and ``prepare_batch`` replace the plugin's defaults above.
    """

    def __init__(self, spg: SPG, *, mask: MaskMode = "auto", **end_task_options: Any) -> None:
        super().__init__()
        self.spg = spg
        self.end_task_options = checked_end_task_options(spg, end_task_options, _WHERE)
        self.mask = mask
        self._optimizers = MaskedOptimizers(spg, mask)
        self.task_labels: list[int] = []  # the task label of each ended task, in order

    def before_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        self._optimizers.release()  # left attached by an experience whose training failed
        if self.spg.tasks_finished != len(self.task_labels):
            raise ValueError(
                f"{_WHERE}: SPG has finished {self.spg.tasks_finished} task(s) but the plugin "
                f"recorded {len(self.task_labels)} experience(s); load SPG's state through the "
                "plugin (load_state_dict, or Avalanche's checkpoint of the strategy)"
            )
        label = _task_label(strategy)
        if self.spg.head_parameters and label in self.task_labels:
            raise ValueError(
                f"{_WHERE}: the experience's task label {label} is that of SPG task "
                f"{self.task_labels.index(label)} already: with per-task heads every experience "
                "needs a task label (a head) of its own; for one shared head build SPG without "
                "heads"
            )
        self._optimizers.add(strategy.optimizer)

    def after_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        self._optimizers.release()
        label = _task_label(strategy)
        dataset = strategy.experience.dataset.train()
        loader = DataLoader(
            dataset,
            batch_size=strategy.train_mb_size,
            collate_fn=getattr(dataset, "collate_fn", None),
        )
        options = {
            "forward": self._forward(strategy.model, label),
            "prepare_batch": _mover(strategy.device),
            **self.end_task_options,
        }
        end_current_task(self.spg, loader, options)
        self.task_labels.append(label)

    def _forward(self, model: Any, label: int) -> Callable[..., Tensor]:
        labels = self.task_labels

        def forward(x: Tensor, *head: int) -> Tensor:
            # end_task calls forward(x, t) for the heads of tasks 0..k (the last: this
            # experience's), forward(x) without heads.
            task = labels[head[0]] if head and head[0] < len(labels) else label
            return avalanche_forward(model, x, task)

        return forward

    def __getstate__(self) -> dict[str, Any]:
        # Pickled with the strategy by Avalanche's checkpoints, between experiences: no optimizer
        # is attached then, and the registry of attached ones holds weak references.
        return {k: v for k, v in self.__dict__.items() if k != "_optimizers"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._optimizers = MaskedOptimizers(self.spg, self.mask)

    def state_dict(self) -> dict[str, Any]:
        """The plugin's state for a checkpoint of your own.

        Returns:
            ``{"format", "spg": spg.state_dict(), "task_labels"}``, which
                ``torch.load(weights_only=True)`` reads.
        """
        return {
            "format": STATE_FORMAT,
            "spg": self.spg.state_dict(),
            "task_labels": list(self.task_labels),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` output into SPG and the plugin.

        Args:
            state: what ``state_dict`` returned.
        """
        if state.get("format") != STATE_FORMAT:
            raise ValueError(
                f"{_WHERE}: state format {state.get('format')!r}; this version reads "
                f"format {STATE_FORMAT}"
            )
        labels = [int(t) for t in state["task_labels"]]
        if len(labels) != state["spg"]["tasks_finished"]:
            raise ValueError(
                f"{_WHERE}: the state records {len(labels)} task label(s) for "
                f"{state['spg']['tasks_finished']} finished task(s)"
            )
        self.spg.load_state_dict(state["spg"])
        self.task_labels = labels


def _task_label(strategy: Any) -> int:
    labels = list(strategy.experience.task_labels)
    if len(labels) != 1:
        raise ValueError(
            f"{_WHERE}: the experience holds task labels {labels}; SPG ends one task per "
            "experience, which needs exactly one"
        )
    return int(labels[0])


def _mover(device: Any) -> Callable[[Any], tuple[Tensor, Tensor]]:
    def move(batch: Any) -> tuple[Tensor, Tensor]:
        x, y = batch[0], batch[1]
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    return move
