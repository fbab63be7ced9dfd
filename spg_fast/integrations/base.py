"""What the framework integrations share: end_task options checked up front, each optimizer masked
once and only through spg-fast's registry, the end-of-task pass over the processes that hold the
task's data, and the record that keeps a framework's checkpoints and SPG's tasks in step."""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from spg_fast.mask_mode import MaskMode, check_mask
from spg_fast.optimizer import AttachHandle
from spg_fast.spg import SPG

STATE_FORMAT = 1
"""Version of the state the callbacks and the Avalanche plugin put into framework checkpoints
(``{"format", "spg", "ended", "over"}``); a bare ``spg.state_dict()`` (what the callbacks saved
before) still loads."""


def checked_end_task_options(
    spg: SPG | type[SPG], options: Mapping[str, Any], where: str
) -> dict[str, Any]:
    """``options`` as keyword arguments for ``spg.end_task`` (everything but the task id and the
    loader, which the integration supplies); a name ``end_task`` does not take is a ``TypeError``
    now rather than at the end of training.

    Args:
        spg: the SPG object the options are for, or the class ``SPG`` for one built later.
        options: the keyword arguments given to the integration.
        where: the integration's name, for the errors.

    Returns:
        A copy of ``options``.
    """
    if spg is not SPG and not isinstance(spg, SPG):
        raise TypeError(f"{where} needs an spg_fast.SPG object, got {type(spg).__name__}")
    signature = inspect.signature(SPG.end_task)
    try:
        signature.bind(None, 0, (), **options)
    except TypeError as err:
        accepted = [n for n in signature.parameters if n not in ("self", "task_id", "loader")]
        raise TypeError(
            f"{where}: {err}; the options are passed to SPG.end_task, which takes "
            f"{', '.join(accepted)} (the integration supplies the task id and the loader)"
        ) from None
    return dict(options)


def check_model_holds(spg: SPG, model: nn.Module, where: str) -> None:
    """Refuse a framework model that does not hold SPG's shared parameters: the framework would
    train (and move) one model while SPG measures another."""
    held = {id(p) for p in model.parameters()}
    outside = [name for name, p in spg.shared_parameters.items() if id(p) not in held]
    if outside:
        more = f" and {len(outside) - 3} more" if len(outside) > 3 else ""
        raise ValueError(
            f"{where}: the model being trained does not hold SPG's shared parameter(s) "
            f"{', '.join(outside[:3])}{more}; build SPG on that model or on a submodule of it"
        )


def data_parallel_group(world_size: int) -> dist.ProcessGroup | None:
    """The group whose processes each train a replica on part of the data.

    Args:
        world_size: the number of training processes.

    Returns:
        The default group when there are several processes, None for one.
    """
    if world_size <= 1:
        return None
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"{world_size} training processes but torch.distributed is not initialised"
        )
    return dist.group.WORLD


def unwrapped(optimizer: Any) -> Optimizer:
    """The ``torch.optim.Optimizer`` inside the wrappers frameworks hand to callbacks (Lightning's
    ``LightningOptimizer``, Accelerate's ``AcceleratedOptimizer``, spg-fast's ``SPGOptimizer``)."""
    inner = optimizer
    while isinstance(getattr(inner, "optimizer", None), Optimizer) and inner.optimizer is not inner:
        inner = inner.optimizer
    if not isinstance(inner, Optimizer):
        raise TypeError(
            f"SPG masks torch.optim optimizers; got a {type(optimizer).__name__} with no "
            "torch.optim.Optimizer inside"
        )
    return inner


class MaskedOptimizers:
    """The optimizers one integration masks, each through ``SPG.attach`` (torch's step pre- and
    post-hooks, so the mask applies wherever and however the framework steps, in the mode
    ``spg_fast.mask_mode`` picks per param group). Attaching registers the optimizer in spg-fast's
    registry, so an optimizer that ``spg.wrap``, ``spg.attach`` or a ``spg_fast.optim`` optimizer
    already masks is refused instead of masked twice; ``release`` detaches them all (a fit or train
    run is over)."""

    def __init__(self, spg: SPG, mask: MaskMode) -> None:
        check_mask(mask)
        self._spg = spg
        self.mask = mask
        self._handles: weakref.WeakKeyDictionary[Optimizer, AttachHandle] = (
            weakref.WeakKeyDictionary()
        )

    def add(self, optimizer: Any) -> Optimizer:
        """Mask ``optimizer`` (a framework's wrapper around a torch optimizer) from now on."""
        inner = unwrapped(optimizer)
        if inner not in self._handles:
            self._handles[inner] = self._spg.attach(inner, mask=self.mask)
        return inner

    def release(self) -> None:
        """Stop masking every optimizer added."""
        for handle in list(self._handles.values()):
            handle.remove()
        self._handles = weakref.WeakKeyDictionary()


def end_current_task(
    spg: SPG,
    loader: Iterable[Any],
    options: Mapping[str, Any],
    process_group: dist.ProcessGroup | None = None,
) -> None:
    """``spg.end_task`` for the task just trained (tasks end in order, so its id is
    ``spg.tasks_finished``), with autograd on whatever mode the framework left.

    Args:
        spg: the SPG object.
        loader: the task's training data (this process's share of it).
        options: further keyword arguments for ``spg.end_task``.
        process_group: the processes whose gradient sums are added (None: this one alone), unless
            ``options`` name a group themselves.
    """
    with torch.enable_grad():
        spg.end_task(
            spg.tasks_finished, loader, **{"process_group": process_group, **dict(options)}
        )


@dataclass(frozen=True)
class Saved:
    """What a framework checkpoint says about SPG's task besides SPG's own state.

    Attributes:
        ended: the task its run trained had been ended (its importance is in the state).
        over: its run's training had finished when it was written (None: not recorded).
    """

    ended: bool
    over: bool | None


def checkpoint_state(spg: SPG, *, ended: bool, over: bool | None) -> dict[str, Any]:
    """SPG's part of a framework checkpoint (``torch.load(weights_only=True)`` reads it).

    Args:
        spg: the SPG object.
        ended: whether the task the run trains has been ended (its importance is in the state).
        over: whether the run's training was over when the checkpoint was written (None: unknown).

    Returns:
        ``{"format": STATE_FORMAT, "spg": spg.state_dict(full=True), "ended": ended, "over":
            over}``: full tensors also on an FSDP2 model (gathered: every process calls it, as
            frameworks do when they write a checkpoint), so any process's copy restores SPG.
    """
    return {"format": STATE_FORMAT, "spg": spg.state_dict(full=True), "ended": ended, "over": over}


def read_checkpoint_state(state: Mapping[str, Any], where: str) -> tuple[dict[str, Any], Saved]:
    """Read ``checkpoint_state`` output back.

    Args:
        state: what a framework checkpoint holds for SPG; a bare ``spg.state_dict()`` (the
            callbacks' earlier format) reads as a task not ended, whether its training was over
            unrecorded.
        where: the integration's name, for the errors.

    Returns:
        SPG's state dict and the ``Saved`` record.
    """
    if "spg" not in state:
        return dict(state), Saved(ended=False, over=None)
    if state.get("format") != STATE_FORMAT:
        raise ValueError(
            f"{where}: SPG's checkpoint state has format {state.get('format')!r}; this version "
            f"reads format {STATE_FORMAT}"
        )
    return state["spg"], Saved(ended=bool(state["ended"]), over=state["over"])


class TaskRun:
    """One framework run (a Lightning ``fit``, a ``Trainer.train()`` call) trains one task; this
    decides whether the run ends a task, from what the checkpoint it resumed from says and whether
    it trained.

    - A run that trains ends its task when its training is over: the task after those in SPG's
      state.
    - A run that trains nothing after resuming from a checkpoint written once its task had ended
      ends nothing (that task is in the state already); after resuming from any other checkpoint it
      ends the task now, before anything else.
    - Training after resuming from a checkpoint written once training was over but before its
      task ended is refused (``before_training``): the task would go unprotected and be measured
      on the next task's data.
    """

    def __init__(self, spg: SPG, where: str) -> None:
        self._spg = spg
        self._where = where
        self.resumed: Saved | None = None
        self.trained = False
        self.ended = False

    def before_training(self) -> None:
        """Call before the run's first training step."""
        if self.trained:
            return
        saved = self.resumed
        if saved is not None and saved.over and not saved.ended:
            task = self._spg.tasks_finished
            raise RuntimeError(
                f"{self._where}: the checkpoint resumed from was written after task {task}'s "
                f"training had finished but before SPG measured task {task} (the run stopped in "
                "between), and this run would train further: task "
                f"{task} would be unprotected and then measured on this run's data. Resume it "
                f"once with task {task}'s data and nothing left to train (the callback then ends "
                f"task {task}), and train the next task from there"
            )
        self.trained = True

    def should_end(self) -> bool:
        """Whether the run, its training over, ends a task."""
        if self.ended:
            return False
        return self.trained or not (self.resumed is not None and self.resumed.ended)
