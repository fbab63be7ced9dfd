"""Drop-in SPG masking for any ``torch.optim.Optimizer``: a wrapping optimizer (``SPG.wrap``) or
torch's step hooks on the optimizer itself (``SPG.attach``), both in the mode
``spg_fast.mask_mode`` picks per param group; and the registry that lets each optimizer be masked
by at most one SPG object, once."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Sequence
from itertools import chain
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.optim import Optimizer

from spg_fast import _sharded as sharded
from spg_fast.mask_mode import MaskMode, check_mask, resolve

Closure = Callable[[], Any]


class _Masker(Protocol):
    """What the integration needs of an SPG object (``spg_fast.SPG``)."""

    @property
    def head_scale(self) -> Tensor | None: ...

    def mask_gradients(self, params: Iterable[Tensor] | None = None) -> None: ...

    @property
    def _generation(self) -> int: ...

    def _update_masker(
        self, params: Sequence[Tensor], before: Sequence[Tensor]
    ) -> Callable[[], None]: ...

    def _check_parameters(self, params: Iterable[Tensor], where: str) -> None: ...


# Optimizer -> how it is masked. Weak keys: registering never keeps an optimizer alive.
_MASKED: weakref.WeakKeyDictionary[Optimizer, str] = weakref.WeakKeyDictionary()


def _register(spg: _Masker, optimizer: Optimizer, how: str) -> None:
    """Record that ``optimizer`` is masked through ``spg`` (``how``: wrap, attach, a fused
    optimizer, a callback); an optimizer already masked, by this SPG object or any other, is
    refused: it would be masked twice."""
    if optimizer in _MASKED:
        raise RuntimeError(
            f"this {type(optimizer).__name__} is already masked through an SPG object "
            f"({_MASKED[optimizer]}); masking twice would scale its steps twice"
        )
    spg._check_parameters(
        (p for g in optimizer.param_groups for p in g["params"]),
        f"SPG.{how}({type(optimizer).__name__})",
    )
    _MASKED[optimizer] = how


def _unregister(optimizer: Optimizer) -> None:
    """Forget that ``optimizer`` is masked (its masking was removed)."""
    _MASKED.pop(optimizer, None)


class _SnapshotBuffers:
    """One buffer per parameter for its values before a step (its local shard under FSDP2),
    allocated the first time the parameter is snapshotted and kept: the memory update masking costs
    around a step that cannot scale its own change."""

    def __init__(self) -> None:
        self._buffers: dict[Tensor, Tensor] = {}

    def of(self, params: Sequence[Tensor]) -> list[Tensor]:
        """The buffers of ``params``, in their order."""
        buffers = self._buffers
        for p in params:
            if p not in buffers:
                buffers[p] = torch.empty_like(sharded.local(p))
        return [buffers[p] for p in params]

    def clear(self) -> None:
        self._buffers.clear()


class _StepMask:
    """SPG's mask around the steps of one optimizer, per param group in its mode
    (``spg_fast.mask_mode.resolve``).

    ``before(closure)`` runs before the step: gradient-mode groups get their gradients masked (after
    every call of the closure, when there is one); update-mode groups get their parameters copied
    into snapshot buffers. ``after()`` runs after the step: the change each update-mode parameter
    made is scaled (``SPG._update_masker``, prepared once for the same parameters and mask), the
    snapshots kept in ``_SnapshotBuffers`` (``spg_fast.optim``'s fused steps need none: they scale
    their own change). Before the first ``end_task`` nothing is done or allocated.
    """

    def __init__(self, spg: _Masker, optimizer: Optimizer, mask: MaskMode) -> None:
        check_mask(mask)
        self._spg = spg
        self._optimizer = optimizer
        self.mask = mask
        self._snapshots = _SnapshotBuffers()
        self._updater: tuple[tuple, tuple[list, list, Callable[[], None]]] | None = None
        self._pending: Callable[[], None] | None = None

    def modes(self) -> list[str]:
        """The mode of each param group now."""
        return [resolve(self.mask, self._optimizer, g) for g in self._optimizer.param_groups]

    def _split(self) -> tuple[list[Tensor], list[Tensor]]:
        gradient: list[Tensor] = []
        update: list[Tensor] = []
        for group, mode in zip(self._optimizer.param_groups, self.modes(), strict=True):
            (gradient if mode == "gradient" else update).extend(group["params"])
        return gradient, update

    @torch.no_grad()
    def before(self, closure: Closure | None) -> Closure | None:
        """Mask gradients or snapshot parameters for the step about to run; returns the closure
        to pass to the step (``closure`` wrapped so that gradients are masked after every call)."""
        self._pending = None
        if self._spg.head_scale is None:
            return closure
        gradient, update = self._split()
        if update:
            # Without a closure only parameters with a gradient can move; with one, the closure
            # makes the gradients, so every parameter is snapshotted.
            moving = update if closure is not None else [p for p in update if p.grad is not None]
            if moving:
                snapshots, local, scale_the_change = self._update_plan(moving)
                torch._foreach_copy_(snapshots, local)
                self._pending = scale_the_change
        if not gradient:
            return closure
        if closure is None:
            self._spg.mask_gradients(gradient)
            return None

        def masked_closure() -> Any:
            loss = closure()
            self._spg.mask_gradients(gradient)
            return loss

        return masked_closure

    def after(self) -> None:
        """Scale the change the step made to each parameter snapshotted by ``before``."""
        if self._pending is not None:
            scale_the_change, self._pending = self._pending, None
            scale_the_change()

    def _update_plan(
        self, params: list[Tensor]
    ) -> tuple[list[Tensor], list[Tensor], Callable[[], None]]:
        """The snapshot buffers of ``params``, their local tensors and SPG's update mask prepared
        for both; kept while the same parameters move and the mask is unchanged."""
        key = (tuple(map(id, params)), self._spg._generation)
        if self._updater is None or self._updater[0] != key:
            snapshots = self._snapshots.of(params)
            local = [sharded.local(p) for p in params]
            self._updater = (key, (snapshots, local, self._spg._update_masker(params, snapshots)))
        return self._updater[1]


def _params(optimizer: Optimizer) -> chain[Tensor]:
    return chain.from_iterable(g["params"] for g in optimizer.param_groups)


class SPGOptimizer(Optimizer):
    """An optimizer that steps the optimizer it wraps with SPG's mask (``spg_fast.mask_mode``).

    ``param_groups``, ``state`` and ``defaults`` are the wrapped optimizer's own objects, so LR
    schedulers, ``GradScaler``, ``state_dict``/``load_state_dict`` (interchangeable with the wrapped
    optimizer's), ``zero_grad`` and ``add_param_group`` act on it. Step hooks registered here run
    around the masked step.
    """

    def __init__(self, optimizer: Optimizer, spg: _Masker, *, mask: MaskMode = "auto") -> None:
        check_mask(mask)
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"SPG.wrap needs a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if isinstance(optimizer, SPGOptimizer):
            raise TypeError("SPG.wrap: this optimizer is already an SPGOptimizer")
        _register(spg, optimizer, "wrap")
        self._optimizer = optimizer
        self._spg = spg
        self._mask = _StepMask(spg, optimizer, mask)
        # Optimizer.__setstate__ creates the hook registries and patches step; unlike __init__ it
        # does not assign param_groups or state, which here belong to the wrapped optimizer.
        super().__setstate__({})

    @property
    def optimizer(self) -> Optimizer:
        """The wrapped optimizer."""
        return self._optimizer

    @property
    def mask(self) -> str:
        """The mask mode asked for (``"auto"``, ``"gradient"`` or ``"update"``)."""
        return self._mask.mask

    def mask_modes(self) -> list[str]:
        """The mode each param group is masked in now (``"auto"`` resolved)."""
        return self._mask.modes()

    def __getattr__(self, name: str) -> Any:
        # Reached only for names this class lacks: what the wrapped optimizer adds to torch's
        # interface (ZeroRedundancyOptimizer.consolidate_state_dict, a scheduler-free optimizer's
        # train()/eval(), ...).
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._optimizer, name)

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self._optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self._optimizer.param_groups = value

    @property  # type: ignore[override]
    def state(self) -> Any:
        return self._optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self._optimizer.state = value

    @property  # type: ignore[override]
    def defaults(self) -> dict[str, Any]:
        return self._optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self._optimizer.defaults = value

    def __getstate__(self) -> dict[str, Any]:
        return {"_optimizer": self._optimizer, "_spg": self._spg, "_mask_mode": self.mask}

    def __setstate__(self, state: dict[str, Any]) -> None:
        mode = state.pop("_mask_mode", "auto")
        super().__setstate__(state)
        self._mask = _StepMask(self._spg, self._optimizer, mode)
        _register(state["_spg"], self._optimizer, "wrap")

    def __repr__(self) -> str:
        return f"SPGOptimizer({self._optimizer!r}, mask={self.mask!r})"

    def step(self, closure: Closure | None = None) -> Any:  # type: ignore[override]
        masked = self._mask.before(closure)
        loss = self._optimizer.step() if masked is None else self._optimizer.step(masked)
        self._mask.after()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer (e.g. a new task's head); its parameters must be
        known to SPG."""
        params = param_group.get("params", [])
        params = [params] if isinstance(params, Tensor) else list(params)
        self._spg._check_parameters(params, "SPGOptimizer.add_param_group")
        self._optimizer.add_param_group({**param_group, "params": params})

    def state_dict(self) -> dict[str, Any]:
        return self._optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._optimizer.load_state_dict(state_dict)

    def register_state_dict_pre_hook(self, hook: Any, prepend: bool = False) -> Any:
        return self._optimizer.register_state_dict_pre_hook(hook, prepend)

    def register_state_dict_post_hook(self, hook: Any, prepend: bool = False) -> Any:
        return self._optimizer.register_state_dict_post_hook(hook, prepend)

    def register_load_state_dict_pre_hook(self, hook: Any, prepend: bool = False) -> Any:
        return self._optimizer.register_load_state_dict_pre_hook(hook, prepend)

    def register_load_state_dict_post_hook(self, hook: Any, prepend: bool = False) -> Any:
        return self._optimizer.register_load_state_dict_post_hook(hook, prepend)


class AttachHandle:
    """Returned by ``SPG.attach``: ``remove()`` stops the masking (also usable as a context
    manager)."""

    def __init__(self, spg: _Masker, optimizer: Optimizer, mask: MaskMode) -> None:
        self._optimizer = optimizer
        self._mask = _StepMask(spg, optimizer, mask)
        self._hooks = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_step_post_hook(self._post_step),
        ]

    @property
    def mask(self) -> str:
        """The mask mode asked for (``"auto"``, ``"gradient"`` or ``"update"``)."""
        return self._mask.mask

    def mask_modes(self) -> list[str]:
        """The mode each param group is masked in now (``"auto"`` resolved)."""
        return self._mask.modes()

    def _pre_step(self, optimizer: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # The hook sees step's own arguments, ``self`` first; a closure may come positionally or by
        # keyword.
        if "closure" in kwargs:
            return args, {**kwargs, "closure": self._mask.before(kwargs["closure"])}
        if len(args) > 1:
            return (args[0], self._mask.before(args[1]), *args[2:]), kwargs
        self._mask.before(None)
        return None

    def _post_step(
        self, optimizer: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        self._mask.after()

    def remove(self) -> None:
        """Stop masking: remove the step hooks and let the optimizer be masked again."""
        for hook in self._hooks:
            hook.remove()
        _unregister(self._optimizer)

    def __enter__(self) -> AttachHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _attach(spg: _Masker, optimizer: Optimizer, *, mask: MaskMode = "auto") -> AttachHandle:
    """Make ``optimizer.step()`` apply SPG's mask, leaving the optimizer object as it is."""
    check_mask(mask)
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"SPG.attach needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(optimizer, SPGOptimizer):
        raise TypeError("SPG.attach: this SPGOptimizer already applies SPG's mask")
    _register(spg, optimizer, "attach")
    return AttachHandle(spg, optimizer, mask)
