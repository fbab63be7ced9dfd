"""What the framework callbacks share: end_task options checked up front, each optimizer masked once
and only through spg-fast's registry, the end-of-task pass, and the set-ups the callbacks refuse."""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from spg_fast.mask_mode import MaskMode, check_mask
from spg_fast.optimizer import AttachHandle
from spg_fast.spg import SPG


def checked_end_task_options(spg: SPG, options: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``options`` as keyword arguments for ``spg.end_task`` (everything but the task id and the
    loader, which the callback supplies); a name ``end_task`` does not take is a ``TypeError`` now
    rather than at the end of training."""
    if not isinstance(spg, SPG):
        raise TypeError(f"{where} needs an spg_fast.SPG object, got {type(spg).__name__}")
    signature = inspect.signature(spg.end_task)
    try:
        signature.bind(0, (), **options)
    except TypeError as err:
        accepted = [n for n in signature.parameters if n not in ("task_id", "loader")]
        raise TypeError(
            f"{where}: {err}; the options are passed to SPG.end_task, which takes "
            f"{', '.join(accepted)} (the callback supplies the task id and the loader)"
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


def refuse_multiprocess(world_size: int, where: str) -> None:
    """One process only: each process of a distributed run would measure the importance on its own
    shard of the data, so the processes would mask with different ``A`` and their replicas would
    drift apart."""
    if world_size > 1:
        raise RuntimeError(
            f"{where} supports a single training process, got world size {world_size}: each "
            "process would measure importance on its own shard of the data and mask differently"
        )


def unwrapped(optimizer: Any) -> Optimizer:
    """The ``torch.optim.Optimizer`` inside the wrappers frameworks hand to callbacks (Lightning's
    ``LightningOptimizer``, Accelerate's ``AcceleratedOptimizer``, spg-fast's ``SPGOptimizer``)."""
    inner = optimizer
    while isinstance(getattr(inner, "optimizer", None), Optimizer) and inner.optimizer is not inner:
        inner = inner.optimizer
    if not isinstance(inner, Optimizer):
        raise TypeError(
            f"SPG callbacks mask torch.optim optimizers; got a {type(optimizer).__name__} with no "
            "torch.optim.Optimizer inside"
        )
    return inner


class MaskedOptimizers:
    """The optimizers one callback masks, each through ``SPG.attach`` (torch's step pre- and
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
        for handle in list(self._handles.values()):
            handle.remove()
        self._handles = weakref.WeakKeyDictionary()


def end_current_task(spg: SPG, loader: Iterable[Any], options: Mapping[str, Any]) -> None:
    """``spg.end_task`` for the task just trained (tasks end in order, so its id is
    ``spg.tasks_finished``), with autograd on whatever mode the framework left."""
    with torch.enable_grad():
        spg.end_task(spg.tasks_finished, loader, **options)
