"""Drop-in SPG masking for any ``torch.optim.Optimizer``: a wrapping optimizer, or a step pre-hook;
and the registry that lets each optimizer be masked by at most one SPG object, once."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Sequence
from itertools import chain
from typing import Any, Protocol

import torch
from torch.optim import Optimizer

Closure = Callable[[], Any]
# What SPGOptimizer masks: the gradient before the step (the paper's method) or the update the
# step made.
MASK_MODES = ("gradient", "update")


class Masker(Protocol):
    """What the integration needs of an SPG object (``spg_fast.SPG``)."""

    def mask_gradients(self, params: Iterable[torch.Tensor] | None = None) -> None: ...

    def mask_updates(
        self, params: Sequence[torch.Tensor], before: Sequence[torch.Tensor]
    ) -> None: ...

    def check_parameters(self, params: Iterable[torch.Tensor], where: str) -> None: ...


# Optimizer -> how it is masked. Weak keys: registering never keeps an optimizer alive.
_MASKED: weakref.WeakKeyDictionary[Optimizer, str] = weakref.WeakKeyDictionary()


def register(spg: Masker, optimizer: Optimizer, how: str) -> None:
    """Record that ``optimizer`` masks its gradients through ``spg`` (``how``: wrap, attach, a fused
    optimizer); an optimizer already masked, by this SPG object or any other, is refused: it would
    scale gradients twice."""
    if optimizer in _MASKED:
        raise RuntimeError(
            f"this {type(optimizer).__name__} already masks its gradients through an SPG object "
            f"({_MASKED[optimizer]}); masking twice would scale gradients twice"
        )
    spg.check_parameters(
        (p for g in optimizer.param_groups for p in g["params"]),
        f"SPG.{how}({type(optimizer).__name__})",
    )
    _MASKED[optimizer] = how


def unregister(optimizer: Optimizer) -> None:
    _MASKED.pop(optimizer, None)


def _params(optimizer: Optimizer) -> chain[torch.Tensor]:
    return chain.from_iterable(g["params"] for g in optimizer.param_groups)


def _masked(spg: Masker, optimizer: Optimizer, closure: Closure | None) -> Closure | None:
    """Mask ``optimizer``'s gradients now, or, given a closure (which recomputes them), after each
    call of it."""
    if closure is None:
        spg.mask_gradients(_params(optimizer))
        return None

    def masked_closure() -> Any:
        loss = closure()
        spg.mask_gradients(_params(optimizer))
        return loss

    return masked_closure


class SPGOptimizer(Optimizer):
    """An optimizer that soft-masks gradients with SPG, then steps the optimizer it wraps.

    ``param_groups``, ``state`` and ``defaults`` are the wrapped optimizer's own objects, so LR
    schedulers, ``GradScaler``, ``state_dict``/``load_state_dict`` (interchangeable with the wrapped
    optimizer's), ``zero_grad`` and ``add_param_group`` act on it. Step hooks registered here run
    around the masked step.
    """

    def __init__(self, optimizer: Optimizer, spg: Masker, *, mask: str = "gradient") -> None:
        if mask not in MASK_MODES:
            raise ValueError(f"mask={mask!r} is not one of {', '.join(MASK_MODES)}")
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"SPG.wrap needs a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if isinstance(optimizer, SPGOptimizer):
            raise TypeError("SPG.wrap: this optimizer is already an SPGOptimizer")
        register(spg, optimizer, "wrap")
        self._optimizer = optimizer
        self._spg = spg
        self._mask = mask
        # Optimizer.__setstate__ creates the hook registries and patches step; unlike __init__ it
        # does not assign param_groups or state, which here belong to the wrapped optimizer.
        super().__setstate__({})

    @property
    def optimizer(self) -> Optimizer:
        """The wrapped optimizer."""
        return self._optimizer

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
        return {"_optimizer": self._optimizer, "_spg": self._spg, "_mask": self._mask}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        register(state["_spg"], self._optimizer, "wrap")

    def __repr__(self) -> str:
        return f"SPGOptimizer({self._optimizer!r}, mask={self._mask!r})"

    def step(self, closure: Closure | None = None) -> Any:  # type: ignore[override]
        if self._mask == "update":
            params = (
                [p for p in _params(self._optimizer) if p.grad is not None]
                if closure is None
                else list(_params(self._optimizer))
            )
            with torch.no_grad():
                before = torch._foreach_mul(
                    params, 1.0
                )  # a copy of every parameter in one multi-tensor launch
            loss = self._optimizer.step() if closure is None else self._optimizer.step(closure)
            self._spg.mask_updates(params, before)
            return loss
        masked = _masked(self._spg, self._optimizer, closure)
        return self._optimizer.step() if masked is None else self._optimizer.step(masked)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer (e.g. a new task's head); its parameters must be
        known to SPG."""
        params = param_group.get("params", [])
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        self._spg.check_parameters(params, "SPGOptimizer.add_param_group")
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
    """Returned by ``SPG.attach``: ``remove()`` stops the masking (also usable as a
    context manager)."""

    def __init__(self, spg: Masker, optimizer: Optimizer) -> None:
        self._spg = spg
        self._optimizer = optimizer
        self._hook = optimizer.register_step_pre_hook(self._pre_step)

    def _pre_step(self, optimizer: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # The hook sees step's own arguments, ``self`` first; a closure may come positionally or
        # by keyword.
        if "closure" in kwargs:
            return args, {**kwargs, "closure": _masked(self._spg, optimizer, kwargs["closure"])}
        if len(args) > 1:
            return (args[0], _masked(self._spg, optimizer, args[1]), *args[2:]), kwargs
        _masked(self._spg, optimizer, None)
        return None

    def remove(self) -> None:
        self._hook.remove()
        unregister(self._optimizer)

    def __enter__(self) -> AttachHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def attach(spg: Masker, optimizer: Optimizer) -> AttachHandle:
    """Make ``optimizer.step()`` soft-mask its gradients first, leaving the optimizer object as
    it is."""
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"SPG.attach needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(optimizer, SPGOptimizer):
        raise TypeError("SPG.attach: this SPGOptimizer already masks its gradients")
    register(spg, optimizer, "attach")
    return AttachHandle(spg, optimizer)
