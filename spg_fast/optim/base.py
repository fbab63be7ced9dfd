"""What the fused masked optimizers share: construction checks, the per-step mask plan, GradScaler
and closures."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from spg_fast import _sharded as sharded
from spg_fast._backend import StepKernels
from spg_fast.optimizer import register
from spg_fast.spg import SPG


def check_hyperparameters(**values: float | Tensor) -> None:
    """Non-negative hyperparameters, with torch's messages (``Invalid learning rate: -1``); ``lr``
    may be a one-element floating-point tensor, as in torch's optimizers (read on the device by
    the kernels)."""
    names = {
        "lr": "learning rate",
        "eps": "epsilon value",
        "weight_decay": "weight_decay value",
        "momentum": "momentum value",
        "dampening": "dampening value",
    }
    for key, value in values.items():
        if isinstance(value, Tensor):
            if key != "lr":
                raise TypeError(f"{key} as a Tensor is not supported; pass a float")
            if value.numel() != 1 or not value.is_floating_point():
                raise ValueError(
                    f"Tensor lr must be a one-element floating-point tensor, got {value.dtype} of "
                    f"shape {tuple(value.shape)}"
                )
            value = float(value)
        if not value >= 0.0:
            raise ValueError(f"Invalid {names[key]}: {value}")


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


class Batch(NamedTuple):
    """Parameters of one dtype in one param group, stepped by one launch: shared ones first, then
    heads. For FSDP2 (DTensor parameters) the tensors the step updates are this rank's shards."""

    params: list[Tensor]  # what the step updates: the parameters, or their local shards
    factors: list[Tensor]  # the shared parameters' mask factors (the backend's)
    scale: Tensor | None  # the head scale; None before the first task (no mask)
    state: tuple[
        list[Tensor], ...
    ]  # the optimizer's state lists (local shards), as its step kernel takes them
    first_step: list[bool]  # per parameter: no state before this step
    keys: list[Tensor]  # the parameters as the optimizer holds them (DTensors under FSDP2)

    def grads(self) -> list[Tensor]:
        """The gradients, laid out as ``params``."""
        if self.keys is self.params:
            return [p.grad for p in self.params]
        return [sharded.local(p.grad) for p in self.keys]


class MaskedOptimizer(Optimizer):
    """Base of ``spg_fast.optim``'s optimizers: torch's update with SPG's mask read inside it.

    The update equals "mask the gradient, then step torch's optimizer"; the SPG object's backend
    (``spg_fast._backend.Ops.step_kernels``) picks how, per batch of one dtype. The Triton kernels
    (CUDA) and the native CPU kernels (contiguous float32/float64) read the mask inside one pass and
    leave ``.grad`` as backward produced it. Otherwise ``.grad`` is masked in place (the spec's
    ``grad <- grad * (1 - A)``) and torch's fused kernel steps. On the CPU the native AdamW step
    measured 1.22x torch's unmasked fused step, mask + torch's fused step 1.45-1.48x
    (bench/NOTES.md). All take GradScaler's ``grad_scale``/``found_inf``.
    """

    def __init__(self, params: Any, defaults: dict[str, Any], spg: SPG) -> None:
        if not isinstance(spg, SPG):
            raise TypeError(f"spg must be an spg_fast.SPG, got {type(spg).__name__}")
        if defaults.get("differentiable"):
            raise ValueError("differentiable=True is not supported by spg_fast.optim")
        self.spg = spg
        super().__init__(params, defaults)
        self._step_supports_amp_scaling = True
        register(spg, self, type(self).__name__)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        where = f"{type(self).__name__}.add_param_group"
        _check_types(params, where)
        if (
            self.param_groups
        ):  # the first groups are checked at registration, with the SPG object's message
            self.spg.check_parameters(params, where)
        super().add_param_group({**param_group, "params": params})

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "spg": self.spg}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._batch_cache.clear()
        if (
            "spg" in state
        ):  # unpickled (load_state_dict also lands here, without it): register the copy
            register(self.spg, self, type(self).__name__)

    def _groups_with_grads(self) -> Iterator[tuple[dict[str, Any], list[Tensor]]]:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                yield group, params

    def _batches(
        self, params: list[Tensor]
    ) -> Iterator[tuple[list[Tensor], list[Tensor], Tensor | None]]:
        """Per dtype, the parameters (shared first, then heads), the shared ones' mask factors
        (the backend's, see ``spg_fast._backend.Ops``) and the head scale (None before the first
        task: no mask)."""
        for p in params:
            if p.grad.is_sparse:
                raise TypeError(
                    f"{type(self).__name__}: a parameter of shape {tuple(p.shape)} has a sparse "
                    "gradient, which is not supported"
                )
        shared, factors, heads = self.spg.mask_split(params)
        batches: dict[torch.dtype, tuple[list[Tensor], list[Tensor], list[Tensor]]] = {}
        for p, factor in zip(shared, factors, strict=True):
            entry = batches.setdefault(p.dtype, ([], [], []))
            entry[0].append(p)
            entry[1].append(factor)
        for p in heads:
            batches.setdefault(p.dtype, ([], [], []))[2].append(p)
        for batch_shared, batch_factors, batch_heads in batches.values():
            yield batch_shared + batch_heads, batch_factors, self.spg.head_scale

    def batches(self, group: dict[str, Any], params: list[Tensor]) -> list[Batch]:
        """The batches of one param group's step (``params``: those with a gradient), their
        state created.

        Cached per group while the same parameters have gradients, the SPG mask is unchanged
        (``SPG.mask_generation``) and ``state`` is the same mapping of as many entries: a
        steady-state step only reads the gradients. ``load_state_dict`` and unpickling clear the
        cache (``__setstate__``). A state tensor replaced by hand inside an entry is not seen; load
        it with ``load_state_dict`` instead."""
        key = (tuple(map(id, params)), self.spg.mask_generation, id(self.state), len(self.state))
        cached = self._batch_cache.get(id(group))
        if cached is not None and cached[0] == key:
            return cached[1]
        batches = [self._batch(group, *parts) for parts in self._batches(params)]
        # From the next step on, every one of these parameters has its state: none takes a
        # first step.
        self._batch_cache[id(group)] = (
            key,
            [b._replace(first_step=[False] * len(b.params)) for b in batches],
        )
        return batches

    def _batch(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        factors: list[Tensor],
        scale: Tensor | None,
    ) -> Batch:
        state, first = self.state_lists(group, params)
        if not sharded.is_sharded(params[0]):  # SPG takes all parameters sharded or none
            return Batch(params, factors, scale, state, first, params)
        shards = tuple([sharded.local(t) for t in tensors] for tensors in state)
        return Batch([sharded.local(p) for p in params], factors, scale, shards, first, params)

    @property
    def _batch_cache(self) -> dict[int, tuple[tuple, list[Batch]]]:
        return self.__dict__.setdefault("_batches_by_group", {})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scaler = (getattr(self, "grad_scale", None), getattr(self, "found_inf", None))
        for group, params in self._groups_with_grads():
            self.update_group(group, self.batches(group, params), *scaler)
        return loss

    def kernels_for(self, tensors: list[Tensor]) -> StepKernels | None:
        """The fused steps serving a batch (every tensor its step touches); None: mask ``.grad``,
        then torch's."""
        return self.spg.ops.step_kernels(tensors)

    def state_lists(
        self, group: dict[str, Any], params: list[Tensor]
    ) -> tuple[tuple[list[Tensor], ...], list[bool]]:
        """The state tensors of ``params`` (created where missing), as the step kernels take them,
        and per parameter whether this is its first step (it had no state)."""
        raise NotImplementedError

    def update_group(
        self,
        group: dict[str, Any],
        batches: list[Batch],
        grad_scale: Tensor | None,
        found_inf: Tensor | None,
    ) -> None:
        raise NotImplementedError
