"""The SPG object: accumulated importance of the shared parameters, and masking of gradients with it."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spg_fast.backend import resolve_backend
from spg_fast.importance_pass import accumulate_head_gradients
from spg_fast.optimizer import AttachHandle, SPGOptimizer, attach
from spg_fast.params import HeadSpec, partition
from spg_fast.reference import compute_dtype

STATE_FORMAT = 1


class SPG:
    """Parameter-level soft-masking (Konishi et al., ICML 2023) for one model trained on a sequence of tasks.

    ``heads`` names the per-task head modules (modules of ``model``, or parameter-name prefixes); every other
    trainable parameter is shared. After learning task ``k`` call ``end_task(k, loader, forward)``; from then on
    every optimizer step (through ``wrap``, ``attach`` or ``mask_gradients``) scales each shared gradient by
    ``1 - A`` and each head gradient by ``1 - mean(A)``. State lives on the parameters' device.

    ``backend`` is ``"auto"``, ``"torch"`` or ``"triton"`` (see ``spg_fast.backend``). ``importance_dtype`` stores
    ``A`` in float32 (the default; float64 for float64 parameters) or bfloat16, which halves its memory and keeps
    ``A`` within a relative 2**-9 (absolute 2**-9, as A < 1) of the float32 value, rounded to nearest.
    Memory per shared element: ``A``, plus (torch backend only) the float32 keep factor ``1 - A`` the mask
    multiplies by; the Triton kernels form ``1 - A`` in registers.
    """

    def __init__(self, model: nn.Module, heads: HeadSpec, *, backend: str = "auto",
                 importance_dtype: torch.dtype | None = None) -> None:
        if importance_dtype not in (None, torch.float32, torch.bfloat16):
            raise ValueError(f"importance_dtype must be None, torch.float32 or torch.bfloat16, got {importance_dtype}")
        self.model = model
        self._heads = heads
        self._importance_dtype = importance_dtype
        self._partition = partition(model, heads)
        self._ops = resolve_backend(backend, list(self._partition.shared.items()), importance_dtype)
        self._tasks_finished = 0
        self._importance: dict[str, Tensor] = {}
        self._head_scale: Tensor | None = None
        self._slots: dict[Tensor, Tensor | None] = {}
        self._users: weakref.WeakKeyDictionary[torch.optim.Optimizer, str] = weakref.WeakKeyDictionary()
        self._rebuild_slots()

    # ------------------------------------------------------------------ views
    @property
    def backend(self) -> str:
        """Name of the backend running the tensor operations."""
        return self._ops.name

    @property
    def tasks_finished(self) -> int:
        """Number of tasks whose importance has been accumulated (calls of ``end_task``)."""
        return self._tasks_finished

    @property
    def shared_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self._partition.shared)

    @property
    def head_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self._partition.heads)

    @property
    def importance(self) -> dict[str, Tensor]:
        """Accumulated importance ``A`` by shared-parameter name; empty before the first ``end_task``."""
        return dict(self._importance)

    @property
    def head_scale(self) -> Tensor | None:
        """``1 - mean(A)`` (a device scalar) that head gradients are multiplied by; None before the first task."""
        return self._head_scale

    # ------------------------------------------------------------ parameters
    def _refresh_partition(self) -> None:
        """Pick up head parameters added to the model since construction; shared ones must not change."""
        fresh = partition(self.model, self._heads)
        old, new = self._partition.shared, fresh.shared
        if old.keys() != new.keys() or any(old[n] is not new[n] for n in old):
            added = sorted(new.keys() - old.keys())
            removed = sorted(old.keys() - new.keys())
            raise ValueError("the model's shared parameters changed after SPG was created "
                             f"(added: {added or 'none'}, removed: {removed or 'none'}); only heads may be added")
        self._partition = fresh
        self._rebuild_slots()

    def _rebuild_slots(self) -> None:
        factors = dict(zip(self._importance, self._ops.mask_factors(list(self._importance.values())), strict=True))
        slots: dict[Tensor, Tensor | None] = {p: None for p in self._partition.heads.values()}
        for name, p in self._partition.shared.items():
            slots[p] = factors.get(name)
        self._slots = slots

    def _name_of(self, param: Tensor) -> str | None:
        return next((n for n, p in self.model.named_parameters() if p is param), None)

    def check_parameters(self, params: Iterable[Tensor], where: str) -> None:
        """Raise ``ValueError`` naming every tensor of ``params`` that SPG cannot mask.

        Shared and head parameters are known (heads added to the model since construction are picked up);
        frozen parameters of the model are accepted, as they get no gradient. Anything else is unknown.
        """
        params = list(params)
        if any(p not in self._slots for p in params):
            self._refresh_partition()
        frozen = {p for p in self.model.parameters() if not p.requires_grad}
        unknown = [p for p in params if p not in self._slots and p not in frozen]
        if unknown:
            described = ", ".join(f"tensor of shape {tuple(p.shape)}" for p in unknown[:5])
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise ValueError(f"{where}: {len(unknown)} optimized tensor(s) are not parameters of the SPG model "
                             f"({described}{more}); SPG cannot mask their gradients")

    def register_user(self, optimizer: torch.optim.Optimizer, how: str) -> None:
        """Record that ``optimizer`` masks through this SPG (``how``), refusing a second registration."""
        if optimizer in self._users:
            raise RuntimeError(f"this optimizer already masks gradients through SPG ({self._users[optimizer]}); "
                               "masking twice would scale gradients twice")
        self.check_parameters((p for g in optimizer.param_groups for p in g["params"]),
                              f"SPG.{how}({type(optimizer).__name__})")
        self._users[optimizer] = how

    def unregister_user(self, optimizer: torch.optim.Optimizer) -> None:
        self._users.pop(optimizer, None)

    # -------------------------------------------------------------- masking
    def _factor(self, p: Tensor) -> Tensor | None:
        """The mask factor of parameter ``p`` (None for a head); picks up heads added since the last look."""
        if p not in self._slots:
            self._refresh_partition()
            if p not in self._slots:
                raise ValueError(f"SPG: parameter {self._name_of(p) or tuple(p.shape)!r} has a gradient but is "
                                 "neither shared nor a head of the SPG model")
        return self._slots[p]

    def mask_plan(self, params: Sequence[Tensor]) -> tuple[list[Tensor | None], Tensor] | None:
        """How to mask ``params``: None before the first ``end_task``; else, per parameter, its backend's mask
        factor (``spg_fast.backend.Ops.mask_factors``; None for a head) and the head scale. For fused optimizers."""
        if self._head_scale is None:
            return None
        return [self._factor(p) for p in params], self._head_scale

    @torch.no_grad()
    def mask_gradients(self, params: Iterable[Tensor] | None = None) -> None:
        """Soft-mask the gradients of ``params`` (default: every shared and head parameter) in place.

        Shared gradients are multiplied by ``1 - A``, head gradients by ``1 - mean(A)``; parameters without a
        gradient are skipped; before the first ``end_task`` nothing changes. One vectorised call, no host sync.
        """
        if self._head_scale is None:
            return
        grads: list[Tensor] = []
        factors: list[Tensor] = []
        head_grads: list[Tensor] = []
        for p in self._slots if params is None else params:
            g = p.grad
            if g is None:
                continue
            factor = self._factor(p)
            if g.is_sparse:
                raise TypeError(f"SPG.mask_gradients: parameter {self._name_of(p)!r} has a sparse gradient, "
                                "which SPG does not support")
            if factor is None:
                head_grads.append(g)
            else:
                grads.append(g)
                factors.append(factor)
        self._ops.soft_mask_(grads, factors, head_grads, self._head_scale)

    # ------------------------------------------------------------- end task
    def end_task(
        self,
        task_id: int,
        loader: Iterable[Any],
        forward: Callable[[Any, int], Tensor] | None = None,
        *,
        loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
        prepare_batch: Callable[[Any], tuple[Any, Tensor]] | None = None,
        train_mode: bool = True,
    ) -> None:
        """Measure the importance of the task just learned and max-accumulate it (the spec's end-of-task pass).

        For each head ``t`` in ``0..task_id`` the gradients of ``loss_fn(forward(x, t), y)`` (``t == task_id``)
        or ``forward(x, t).sum()`` (earlier heads) are summed over every batch of ``loader``; the importance of
        task ``task_id`` is the element-wise max over heads of ``|tanh(standardize(grad))|``.

        ``forward(x, head_id)`` returns that head's logits (default ``model(x, head_id)``); ``prepare_batch``
        turns what ``loader`` yields into ``(x, y)`` on the right device (default: move the pair's tensors to the
        parameters' device). The model runs in train mode (dropout active, as the authors' code does) unless
        ``train_mode=False``; its previous mode is restored. Parameter gradients are left as None.
        On any error the accumulated importance is left exactly as it was.
        """
        if task_id != self._tasks_finished:
            raise ValueError(f"end_task(task_id={task_id}): SPG has finished {self._tasks_finished} task(s), so "
                             f"the task to end is {self._tasks_finished}; tasks are ended in order, once each")
        self._refresh_partition()
        shared = self._partition.shared
        work = ([a.clone() for a in self._importance.values()] if self._importance else
                [torch.zeros_like(p, dtype=self._storage_dtype(p)) for p in shared.values()])
        device = next(iter(shared.values())).device
        forward = forward or self.model
        prepare_batch = prepare_batch or _mover(device)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        was_training = self.model.training
        self.model.train(train_mode)
        try:
            for head in range(task_id + 1):
                head_loss = loss_fn if head == task_id else _logit_sum
                accumulate_head_gradients(trainable, loader, forward, head, head_loss, prepare_batch)
                present = [(i, p.grad) for i, p in enumerate(shared.values()) if p.grad is not None]
                flags = self._ops.importance_max_([work[i] for i, _ in present], [g for _, g in present])
                if bool(flags.any()):
                    names = list(shared)
                    bad = [names[present[i][0]] for i in flags.nonzero().flatten().tolist()]
                    raise FloatingPointError(
                        f"SPG.end_task({task_id}): non-finite gradient (NaN or Inf) for head {head} in "
                        f"parameter(s) {', '.join(bad)}; the accumulated importance is unchanged")
        finally:
            for p in trainable:
                p.grad = None
            self.model.train(was_training)
        self._commit(dict(zip(shared, work, strict=True)), task_id + 1)

    def _commit(self, importance: dict[str, Tensor], tasks_finished: int) -> None:
        self._importance = importance
        self._tasks_finished = tasks_finished
        values = list(importance.values())
        self._head_scale = self._ops.head_scale(values) if values else None
        self._rebuild_slots()

    # ----------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Importance by shared-parameter name and the number of finished tasks; ``torch.load(weights_only=True)``
        reads it back."""
        return {"format": STATE_FORMAT, "tasks_finished": self._tasks_finished,
                "importance": dict(self._importance)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore ``state_dict()`` output; every problem is reported at once and nothing changes on error."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"SPG state dict must be a mapping, got {type(state_dict).__name__}")
        expected_keys = {"format", "tasks_finished", "importance"}
        if set(state_dict) != expected_keys:
            raise ValueError(f"SPG state dict must have keys {sorted(expected_keys)}, got {sorted(state_dict)}")
        if state_dict["format"] != STATE_FORMAT:
            raise ValueError(f"SPG state dict format {state_dict['format']!r} is not the supported {STATE_FORMAT}")
        tasks = state_dict["tasks_finished"]
        if not isinstance(tasks, int) or isinstance(tasks, bool) or tasks < 0:
            raise ValueError(f"SPG state dict: tasks_finished must be an int >= 0, got {tasks!r}")
        saved = state_dict["importance"]
        if not isinstance(saved, Mapping):
            raise TypeError(f"SPG state dict: importance must be a mapping, got {type(saved).__name__}")
        self._refresh_partition()
        shared = self._partition.shared
        if tasks == 0:
            if saved:
                raise ValueError("SPG state dict: tasks_finished is 0 but importance has entries")
            self._commit({}, 0)
            return
        problems = []
        missing = [n for n in shared if n not in saved]
        extra = [n for n in saved if n not in shared]
        if missing:
            problems.append(f"missing importance for {', '.join(missing)}")
        if extra:
            problems.append(f"unexpected entries {', '.join(map(str, extra))}")
        for name in shared.keys() & saved.keys():
            value, param = saved[name], shared[name]
            if not isinstance(value, Tensor) or not value.is_floating_point():
                problems.append(f"{name}: expected a floating-point tensor, got {getattr(value, 'dtype', value)!r}")
            elif value.shape != param.shape:
                problems.append(f"{name}: shape {tuple(value.shape)} does not match the parameter's "
                                f"{tuple(param.shape)}")
            elif not bool(((value >= 0) & (value <= 1)).all()):
                problems.append(f"{name}: importance values must lie in [0, 1] (NaN is not allowed)")
        if problems:
            raise ValueError("SPG state dict does not match the model: " + "; ".join(problems))
        self._commit({n: saved[n].to(device=p.device, dtype=self._storage_dtype(p), copy=True)
                      for n, p in shared.items()}, tasks)

    def _storage_dtype(self, param: Tensor) -> torch.dtype:
        return self._importance_dtype or compute_dtype(param.dtype)

    # ----------------------------------------------------------- integration
    def wrap(self, optimizer: torch.optim.Optimizer) -> SPGOptimizer:
        """A ``torch.optim.Optimizer`` that masks the gradients, then steps ``optimizer``."""
        return SPGOptimizer(optimizer, self)

    def attach(self, optimizer: torch.optim.Optimizer) -> AttachHandle:
        """Mask gradients before every ``optimizer.step()`` through a step pre-hook; returns a removable handle."""
        return attach(self, optimizer)


def _logit_sum(logits: Tensor, _target: Tensor) -> Tensor:
    return logits.sum()


def _mover(device: torch.device) -> Callable[[Any], tuple[Any, Tensor]]:
    def move(batch: Any) -> tuple[Any, Tensor]:
        if not isinstance(batch, tuple | list) or len(batch) != 2:
            raise TypeError(f"the loader yielded a {type(batch).__name__}, not an (x, y) pair; pass "
                            "prepare_batch to turn its batches into (x, y)")
        x, y = batch
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    return move
