"""What the fused masked optimizers share: construction (torch's own checks, then spg-fast's), the
step plan of each param group, the fallback step around torch's fused kernels, GradScaler and
closures."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from spg_fast import _sharded as sharded
from spg_fast._backend import StepKernels
from spg_fast.mask_mode import MaskMode, check_mask, resolve
from spg_fast.optimizer import _register, _SnapshotBuffers
from spg_fast.spg import SPG


def torch_checked(
    torch_class: type[Optimizer], params: Any, options: dict[str, Any]
) -> list[dict[str, Any]]:
    """``params`` as a list of param groups, after ``torch_class`` has checked them and
    ``options`` as torch does (an invalid value raises torch's own error), then spg-fast's own
    limits: ``differentiable=True``, ``foreach=True``, ``fused=False`` and hyperparameters other
    than ``lr`` given as tensors are refused by name (the step is always spg-fast's fused one)."""
    if isinstance(params, Tensor):  # torch's TypeError: an iterable of tensors is wanted
        torch_class(params, **options)
    groups = list(params)
    # Torch fills defaults into group dicts it is given: it checks copies.
    torch_class([dict(g) if isinstance(g, dict) else g for g in groups], **options)
    where = torch_class.__name__
    if options.get("differentiable"):
        raise ValueError(
            f"spg_fast.optim.{where}: differentiable=True is not supported (the fused step is not "
            "differentiable); wrap a torch.optim optimizer with spg.wrap instead"
        )
    if options.get("foreach") or options.get("fused") is False:
        raise ValueError(
            f"spg_fast.optim.{where}: foreach=True and fused=False are not supported: the step is "
            "always spg-fast's fused one (fused=None or True); for torch's foreach or for-loop "
            f"implementation use spg.wrap(torch.optim.{where}(..., foreach=...))"
        )
    for group in [options, *(g for g in groups if isinstance(g, dict))]:
        for key, value in group.items():
            values = value if key == "betas" else (value,)
            if key not in ("lr", "params") and any(isinstance(v, Tensor) for v in values):
                raise TypeError(
                    f"spg_fast.optim.{where}: {key} as a Tensor is not supported; pass a float "
                    "(only lr may be a tensor)"
                )
    return groups


def _check_types(params: list[Tensor], where: str) -> None:
    """Refuse tensor subclasses other than FSDP2's DTensor (whose local shards the steps update):
    the fused steps address a tensor's memory directly."""
    for p in params:
        if type(p) not in (Tensor, torch.nn.Parameter) and not sharded.is_sharded(p):
            raise TypeError(
                f"{where}: a parameter of shape {tuple(p.shape)} is a {type(p).__name__}; "
                "spg_fast.optim steps plain tensors and FSDP2's DTensors only. Wrap a torch.optim "
                "optimizer with spg.wrap instead"
            )


@dataclass
class Batch:
    """The parameters of one dtype in one param group, stepped by one launch: shared ones first,
    then heads. For FSDP2 (DTensor parameters) the tensors the step updates are this rank's
    shards."""

    params: list[Tensor]  # what the step updates: the parameters, or their local shards
    keeps: list[Tensor]  # the shared parameters' stored keep factors (spg_fast.storage)
    scale: Tensor | None  # the head scale; None before the first task (no mask)
    state: tuple[list[Tensor], ...]  # the optimizer's state lists, as its step kernel takes them
    first_step: list[bool]  # per parameter: no state before this step
    keys: list[Tensor]  # the parameters as the optimizer holds them (DTensors under FSDP2)
    fused: Callable[..., None] | None  # the backend's fused step, prepared; None: the fallback
    # The fallback's snapshot buffers and update mask, once prepared.
    update_mask: tuple[list[Tensor], Callable[[], None]] | None = None

    def grads(self) -> list[Tensor]:
        """The gradients, laid out as ``params``."""
        if self.keys is self.params:
            return [p.grad for p in self.params]
        return [sharded.local(p.grad) for p in self.keys]


@dataclass
class _GroupPlan:
    """A param group's step plan: valid while ``key`` (the parameters with a gradient, SPG's mask
    generation and the state mapping) is unchanged."""

    key: tuple
    batches: list[Batch]


class MaskedOptimizer(Optimizer):
    """Base of ``spg_fast.optim``'s optimizers: torch's update with SPG's mask inside it.

    Each param group is masked in its mode (``mask``, resolved per group by
    ``spg_fast.mask_mode``): the gradient masked before torch's update, or torch's update on the
    unmasked gradient with its change masked. The SPG object's backend picks, once per plan, how
    each batch of one dtype steps (``spg_fast._backend.Ops.step_kernels``): the Triton kernels
    (CUDA) and the native CPU kernels (contiguous float32/float64) read the stored keep factors
    inside one pass over the parameter and leave ``.grad`` as backward produced it. Otherwise
    torch's fused kernel steps, after ``.grad`` is masked in place (gradient mode) or between a
    snapshot of the parameters and the scaling of their change (update mode; the snapshot buffers
    are kept). All take GradScaler's ``grad_scale``/``found_inf``.

    A group's plan (its batches, state lists and prepared fused steps, whose launch tables are built
    once) is reused while the same parameters have gradients, SPG's mask is unchanged, ``state``
    is the same mapping of as many entries and the group's settings ask for the same state tensors
    (``state_layout``): in a training loop with ``zero_grad()`` a steady-state
    step only reads the gradients and points the launch at them. ``load_state_dict`` and unpickling
    drop the plans. ``plan_builds`` counts the plans built.
    """

    def __init__(
        self, params: list[Any], defaults: dict[str, Any], spg: SPG, mask: MaskMode
    ) -> None:
        if not isinstance(spg, SPG):
            raise TypeError(f"spg must be an spg_fast.SPG, got {type(spg).__name__}")
        check_mask(mask)
        self.spg = spg
        self.mask = mask
        self.plan_builds = 0
        super().__init__(params, defaults)
        self._step_supports_amp_scaling = True
        _register(spg, self, type(self).__name__)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        items = param_group["params"]
        items = [items] if isinstance(items, Tensor) else list(items)
        named = bool(items) and isinstance(items[0], tuple)
        tensors = [p for _, p in items] if named else items
        where = f"{type(self).__name__}.add_param_group"
        _check_types(tensors, where)
        if self.param_groups:  # the first groups are checked at registration, with its message
            self.spg._check_parameters(tensors, where)
        super().add_param_group({**param_group, "params": items})

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "spg": self.spg, "mask": self.mask}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("mask", "auto")
        self.__dict__.setdefault("plan_builds", 0)
        self._plans.clear()
        self._snapshots.clear()
        if "spg" in state:  # unpickled (load_state_dict lands here too, without it): register
            _register(self.spg, self, type(self).__name__)

    @property
    def _plans(self) -> dict[int, _GroupPlan]:
        return self.__dict__.setdefault("_plans_by_group", {})

    @property
    def _snapshots(self) -> _SnapshotBuffers:
        return self.__dict__.setdefault("_update_snapshots", _SnapshotBuffers())

    def mask_modes(self) -> list[str]:
        """The mode each param group is masked in now (``"auto"`` resolved)."""
        return [resolve(self.mask, self, g) for g in self.param_groups]

    # ------------------------------------------------------------------ plans
    def plan(self, group: dict[str, Any], params: list[Tensor]) -> list[Batch]:
        """The batches of one param group's step (``params``: those with a gradient), built when
        the group's key changed (see the class docstring), their state created."""
        cached = self._plans.get(id(group))
        if cached is not None and cached.key == self._plan_key(group, params):
            return cached.batches
        return self._build_plan(group, params)

    def _plan_key(self, group: dict[str, Any], params: list[Tensor]) -> tuple:
        """What a group's plan is valid for (see the class docstring)."""
        return (
            tuple(map(id, params)),
            self.spg._generation,
            id(self.state),
            len(self.state),
            self.state_layout(group),
        )

    # torch.compile runs a step's planning eagerly: it builds native libraries and launch tables.
    @torch.compiler.disable
    def _build_plan(self, group: dict[str, Any], params: list[Tensor]) -> list[Batch]:
        for p in params:
            if p.grad.is_sparse:
                raise TypeError(
                    f"{type(self).__name__}: a parameter of shape {tuple(p.shape)} has a sparse "
                    "gradient, which is not supported"
                )
        shared, keeps, heads = self.spg._mask_split(params)
        by_dtype: dict[torch.dtype, tuple[list[Tensor], list[Tensor]]] = {}
        for p, keep in zip(shared, keeps, strict=True):
            entry = by_dtype.setdefault(p.dtype, ([], []))
            entry[0].append(p)
            entry[1].append(keep)
        for p in heads:
            by_dtype.setdefault(p.dtype, ([], []))[0].append(p)
        batches = [self._batch(group, ps, ks) for ps, ks in by_dtype.values()]
        self.plan_builds += 1
        # Keyed by the state as this step's batches left it (they created what was missing).
        later = [replace(b, first_step=[False] * len(b.params)) for b in batches]
        self._plans[id(group)] = _GroupPlan(self._plan_key(group, params), later)
        return batches

    def _batch(self, group: dict[str, Any], keys: list[Tensor], keeps: list[Tensor]) -> Batch:
        state, first = self.state_lists(group, keys)
        params = keys
        if sharded.is_sharded(keys[0]):  # SPG takes all parameters sharded or none
            params = [sharded.local(p) for p in keys]
            state = tuple([sharded.local(t) for t in tensors] for tensors in state)
        touched = [*params, *(t for tensors in state for t in tensors)]
        kernels = self.spg._ops.step_kernels(touched, keeps)
        fused = None if kernels is None else self.prepare(kernels, params, keeps, state)
        return Batch(params, keeps, self.spg.head_scale, state, first, keys, fused)

    # ------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scaler = (getattr(self, "grad_scale", None), getattr(self, "found_inf", None))
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            update = resolve(self.mask, self, group) == "update"
            for batch in self.plan(group, params):
                if batch.fused is not None:
                    self.fused_step(group, batch, update, *scaler)
                else:
                    self._fallback_step(group, batch, update, *scaler)
        return loss

    def _fallback_step(
        self,
        group: dict[str, Any],
        batch: Batch,
        update: bool,
        grad_scale: Tensor | None,
        found_inf: Tensor | None,
    ) -> None:
        """Torch's fused step around SPG's mask: the gradient masked first, or the parameters
        snapshotted first and their change scaled after."""
        if batch.scale is None or not update:
            self.spg.mask_gradients(batch.keys)
            self.torch_step(group, batch, grad_scale, found_inf)
            return
        if batch.update_mask is None:  # prepared once per plan, with its snapshot buffers
            snapshots = self._snapshots.of(batch.params)
            batch.update_mask = (snapshots, self.spg._update_masker(batch.keys, snapshots))
        snapshots, scale_the_change = batch.update_mask
        torch._foreach_copy_(snapshots, batch.params)
        self.torch_step(group, batch, grad_scale, found_inf)
        scale_the_change()

    # ---------------------------------------------------- per-optimizer parts
    def state_lists(
        self, group: dict[str, Any], params: list[Tensor]
    ) -> tuple[tuple[list[Tensor], ...], list[bool]]:
        """The state tensors of ``params`` (created where missing), as the step kernels take them,
        and per parameter whether this is its first step (it had no state)."""
        raise NotImplementedError

    def state_layout(self, group: dict[str, Any]) -> tuple:
        """The settings of ``group`` that decide which state tensors its step uses (SGD's
        momentum on or off, Adam's amsgrad): part of the plan's key, so that changing one between
        steps builds a new plan, as torch builds its state lists on every step."""
        raise NotImplementedError

    def prepare(
        self,
        kernels: StepKernels,
        params: list[Tensor],
        keeps: list[Tensor],
        state: tuple[list[Tensor], ...],
    ) -> Callable[..., None]:
        """The backend's fused step prepared for one batch's tensors (``kernels.sgd`` or
        ``kernels.adam``)."""
        raise NotImplementedError

    def fused_step(
        self,
        group: dict[str, Any],
        batch: Batch,
        update: bool,
        grad_scale: Tensor | None,
        found_inf: Tensor | None,
    ) -> None:
        """One batch's step on its prepared fused step (``batch.fused``)."""
        raise NotImplementedError

    def torch_step(
        self,
        group: dict[str, Any],
        batch: Batch,
        grad_scale: Tensor | None,
        found_inf: Tensor | None,
    ) -> None:
        """One batch's step with torch's fused kernel, on the gradients as they are."""
        raise NotImplementedError
