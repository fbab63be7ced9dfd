"""The SPG object: accumulated importance of the shared parameters, and masking of gradients
with it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import closing
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from spg_fast import _sharded as sharded
from spg_fast._backend import Ops, resolve_backend
from spg_fast._distributed import summed_across_processes, wrapper_forward_refused
from spg_fast._importance_pass import HeadSums, ImportancePass, PassReport
from spg_fast._model_state import preserved
from spg_fast._params import HeadSpec, inner_module, partition
from spg_fast.optimizer import AttachHandle, SPGOptimizer, attach
from spg_fast.reference import compute_dtype
from spg_fast.usage import Usage, usage

STATE_FORMAT = 1


class SPG:
    """Parameter-level soft-masking (Konishi et al., ICML 2023) for one model trained on a sequence
    of tasks.

    ``heads`` names the per-task head modules (modules of ``model``, or parameter-name prefixes);
    every other trainable parameter is shared. ``heads=None`` (the default) is a model without
    per-task heads (one shared output: domain-incremental learning, continual fine-tuning): every
    trainable parameter is shared, and the model is called as ``model(x)``. After learning task
    ``k`` call ``end_task(k, loader, forward)``; from then on every optimizer step (through
    ``wrap``, ``attach`` or ``mask_gradients``) scales each shared gradient by ``1 - A`` and each
    head gradient by ``1 - mean(A)``. State lives on the parameters' device.

    ``model`` may be wrapped in DistributedDataParallel or ``torch.compile``: parameter names
    (``heads`` prefixes, ``importance``, checkpoints) are those of the inner module, so they do not
    depend on the wrapper; a DDP model's ``end_task`` gives every rank the importance of all ranks'
    data (``spg_fast._distributed``). On an FSDP2 model (``fully_shard``) ``A``, the mask factors
    and ``importance`` are sharded like the parameters, and ``end_task``, ``load_state_dict`` and
    ``state_dict(full=True)`` are collectives every rank calls (``spg_fast._sharded``).

    ``backend`` is ``"auto"``, ``"torch"`` or ``"triton"`` (see ``spg_fast._backend``).
    ``importance_dtype`` stores ``A`` in float32 (the default; float64 for float64 parameters) or
    bfloat16, which halves its memory and keeps ``A`` within a relative 2**-9 (absolute 2**-9, as
    A < 1) of the float32 value, rounded to nearest. Memory per shared element: ``A``, plus (torch
    backend only) the float32 keep factor ``1 - A`` the mask multiplies by; the Triton kernels form
    ``1 - A`` in registers.
    """

    def __init__(
        self,
        model: nn.Module,
        heads: HeadSpec | None = None,
        *,
        backend: str = "auto",
        importance_dtype: torch.dtype | None = None,
    ) -> None:
        if importance_dtype not in (None, torch.float32, torch.bfloat16):
            raise ValueError(
                "importance_dtype must be None, torch.float32 or torch.bfloat16, got "
                f"{importance_dtype}"
            )
        self.model = model
        self._inner = inner_module(model)
        self._heads = heads
        self._importance_dtype = importance_dtype
        self._partition = partition(self._inner, heads)
        self._sharded = sharded.check_layout(
            [*self._partition.shared.items(), *self._partition.heads.items()]
        )
        self._ops = resolve_backend(backend, self._local_shared(), importance_dtype)
        self._tasks_finished = 0
        self._importance: dict[str, Tensor] = {}
        self._head_scale: Tensor | None = None
        self._factors: dict[str, Tensor] = {}
        self._slots: dict[Tensor, Tensor | None] = {}
        self._rebuild_slots()

    # ------------------------------------------------------------------ views
    @property
    def backend(self) -> str:
        """Name of the backend running the tensor operations."""
        return self._ops.name

    @property
    def ops(self) -> Ops:
        """The backend's operations (``spg_fast._backend.Ops``), which ``spg_fast.optim``
        steps with."""
        return self._ops

    def __getstate__(self) -> dict[str, Any]:
        # The backend's ops hold compiled kernels; a pickle records the backend's name and resolves
        # it again.
        state = {**self.__dict__, "_ops": self._ops.name}
        state.pop("_mask_cache", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._ops = resolve_backend(state["_ops"], self._local_shared(), self._importance_dtype)

    def _local_shared(self) -> list[tuple[str, Tensor]]:
        return [(n, sharded.local(p)) for n, p in self._partition.shared.items()]

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
        """Accumulated importance ``A`` by shared-parameter name; empty before the
        first ``end_task``."""
        return dict(self._importance)

    @property
    def head_scale(self) -> Tensor | None:
        """``1 - mean(A)`` (a device scalar) that head gradients are multiplied by; None before the
        first task."""
        return self._head_scale

    def usage(self) -> Usage:
        """How much of the network the importance has claimed: mean ``A`` and the fractions of
        shared elements with ``A`` above 0.5 and 0.9, overall and per shared parameter, and the
        head scale (``spg_fast.usage``). On an FSDP2 model a collective: call it on every rank."""
        shared = self._partition.shared
        numels = {n: p.numel() for n, p in shared.items()}
        importance = {n: sharded.local(a) for n, a in self._importance.items()}
        reduce = None
        if self._sharded and importance:
            group = sharded.process_group(list(shared.values()))

            def reduce(t: Tensor) -> None:
                dist.all_reduce(t, group=group)

        return usage(importance, numels, self._tasks_finished, reduce)

    # ------------------------------------------------------------ parameters
    def _refresh_partition(self) -> None:
        """Pick up head parameters added to the model since construction; shared ones must
        not change."""
        fresh = partition(self._inner, self._heads)
        old, new = self._partition.shared, fresh.shared
        if old.keys() != new.keys() or any(old[n] is not new[n] for n in old):
            added = sorted(new.keys() - old.keys())
            removed = sorted(old.keys() - new.keys())
            raise ValueError(
                "the model's shared parameters changed after SPG was created "
                f"(added: {added or 'none'}, removed: {removed or 'none'}); only heads may be added"
            )
        self._partition = fresh
        self._rebuild_slots()

    def _rebuild_slots(self) -> None:
        slots: dict[Tensor, Tensor | None] = {p: None for p in self._partition.heads.values()}
        for name, p in self._partition.shared.items():
            slots[p] = self._factors.get(name)
        self._slots = slots
        self._generation = getattr(self, "_generation", 0) + 1

    @property
    def mask_generation(self) -> int:
        """A number that changes whenever ``mask_split`` may answer differently (a task ended, a
        checkpoint was loaded, a head was added), so that callers can cache its answer."""
        return self._generation

    def _name_of(self, param: Tensor) -> str | None:
        return next((n for n, p in self._inner.named_parameters() if p is param), None)

    def check_parameters(self, params: Iterable[Tensor], where: str) -> None:
        """Raise ``ValueError`` naming every tensor of ``params`` that SPG cannot mask.

        Shared and head parameters are known (heads added to the model since construction are
        picked up); frozen parameters of the model are accepted, as they get no gradient. Anything
        else is unknown.
        """
        params = list(params)
        if any(p not in self._slots for p in params):
            self._refresh_partition()
        frozen = {p for p in self.model.parameters() if not p.requires_grad}
        unknown = [p for p in params if p not in self._slots and p not in frozen]
        if unknown:
            described = ", ".join(f"tensor of shape {tuple(p.shape)}" for p in unknown[:5])
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise ValueError(
                f"{where}: {len(unknown)} optimized tensor(s) are not parameters of the SPG model "
                f"({described}{more}); SPG cannot mask their gradients"
            )

    # -------------------------------------------------------------- masking
    def _factor(self, p: Tensor) -> Tensor | None:
        """The mask factor of parameter ``p`` (None for a head); picks up heads added since the
        last look."""
        if p not in self._slots:
            self._refresh_partition()
            if p not in self._slots:
                raise ValueError(
                    f"SPG: parameter {self._name_of(p) or tuple(p.shape)!r} has a gradient but is "
                    "neither shared nor a head of the SPG model"
                )
        return self._slots[p]

    @torch.no_grad()
    def mask_gradients(self, params: Iterable[Tensor] | None = None) -> None:
        """Soft-mask the gradients of ``params`` (default: every shared and head parameter)
        in place.

        Shared gradients are multiplied by ``1 - A``, head gradients by ``1 - mean(A)``; parameters
        without a gradient are skipped; before the first ``end_task`` nothing changes. One
        vectorised call, no host sync.
        """
        if self._head_scale is None:
            return
        shared, factors, heads = self.mask_split(
            list(self._slots) if params is None else list(params)
        )
        for p in (*shared, *heads):
            if p.grad is not None and p.grad.is_sparse:
                raise TypeError(
                    f"SPG.mask_gradients: parameter {self._name_of(p)!r} has a sparse gradient, "
                    "which SPG does not support"
                )
        grads = [p.grad for p in shared]
        head_grads = [sharded.local(p.grad) for p in heads if p.grad is not None]
        if any(g is None for g in grads):
            factors = [f for f, g in zip(factors, grads, strict=True) if g is not None]
            grads = [g for g in grads if g is not None]
        self._ops.soft_mask_(
            [sharded.local(g) for g in grads], factors, head_grads, self._head_scale
        )

    def mask_split(
        self, params: Sequence[Tensor]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """``params`` split into the shared ones, their backend mask factors
        (``spg_fast._backend.Ops.mask_factors``) and the heads, each in the given order; before the
        first ``end_task`` every parameter counts as a head (there are no factors, and
        ``head_scale`` is None: no mask). Used by ``mask_gradients`` and the fused optimizers;
        cached while the same parameters are asked about and the mask is unchanged
        (``mask_generation``), so a steady-state step does no per-parameter lookups."""
        ids = tuple(map(id, params))
        cached = self.__dict__.get("_mask_cache")
        if cached is not None and cached[0] == (ids, self._generation):
            return cached[1]
        shared, factors, heads = [], [], []
        for p in params:
            factor = self._factor(p)
            if factor is None:
                heads.append(p)
            else:
                shared.append(p)
                factors.append(factor)
        self._mask_cache = (
            (ids, self._generation),
            (shared, factors, heads),
        )  # after any refresh _factor made
        return shared, factors, heads

    # ------------------------------------------------------------- end task
    def end_task(
        self,
        task_id: int,
        loader: Iterable[Any],
        forward: Callable[..., Any] | None = None,
        *,
        loss_fn: Callable[[Any, Any], Tensor] = F.cross_entropy,
        prepare_batch: Callable[[Any], tuple[Any, Any]] | None = None,
        train_mode: bool = True,
        shared_forward: bool | None = None,
        memory_budget: int | None = None,
    ) -> PassReport:
        """Measure the importance of the task just learned and max-accumulate it (the spec's
        end-of-task pass).

        For each head ``t`` in ``0..task_id`` the gradients of ``loss_fn(forward(x, t), y)``
        (``t == task_id``) or ``forward(x, t).sum()`` (earlier heads) are summed over every batch of
        ``loader``; the importance of task ``task_id`` is the element-wise max over heads of
        ``|tanh(standardize(grad))|``. Without per-task heads (``heads=None``) only the task's own
        loss ``loss_fn(forward(x), y)`` is measured.

        ``forward(x, head_id)`` (``forward(x)`` when ``heads=None``) returns the output ``loss_fn``
        takes (default: the model without its DDP / ``torch.compile`` wrapper; under DDP it must not
        call the DDP wrapper, whose forward takes part in collectives); ``prepare_batch`` turns what
        ``loader`` yields into ``(x, y)`` on the right device (default: move the pair's tensors to
        the parameters' device); ``loss_fn(output, y)`` must return a scalar tensor. The model runs
        in train mode (dropout active, as the authors' code does) unless ``train_mode=False``.

        ``shared_forward``: None (default) runs the model's shared part once per batch for all
        heads unless the forward draws random numbers (dropout in train mode), where each head
        gets its own forward as in the authors' code; True forces one forward per batch (all
        heads then see the same dropout masks), False one per head. ``memory_budget`` bounds, in
        bytes, the per-head gradient buffers held at once (default: a quarter of the free memory
        of the parameters' device); heads that do not fit share a later pass over the data. See
        ``spg_fast._importance_pass``. On an FSDP2 model each head gets its own forward through
        the sharded model (``shared_forward=True`` is refused; ``memory_budget`` does not apply):
        see ``spg_fast._sharded``.

        The model is left as it was found, on success and on error: parameters, buffers (BatchNorm
        running statistics), each module's train/eval mode and ``.grad`` (never touched: the pass
        takes its gradients into its own buffers; under FSDP2, whose backward writes them, put back
        as they were). On any error the accumulated importance is left exactly as it was; a
        non-finite loss is reported with its head and batch, a non-finite gradient with its head,
        parameters and first batch (found by repeating that head's pass). Returns what the pass did
        (``spg_fast._importance_pass.PassReport``).
        """
        if task_id != self._tasks_finished:
            raise ValueError(
                f"end_task(task_id={task_id}): SPG has finished {self._tasks_finished} task(s), so "
                f"the task to end is {self._tasks_finished}; tasks are ended in order, once each"
            )
        self._refresh_partition()
        shared = self._partition.shared
        names, params = list(shared), list(shared.values())
        label = f"SPG.end_task({task_id}): "
        if self._sharded and shared_forward:
            raise ValueError(
                f"{label}shared_forward=True is not supported on FSDP2 (sharded) models: "
                "the importance pass runs one forward per head through the sharded model"
            )
        work = (
            [sharded.local(a).clone() for a in self._importance.values()]
            if self._importance
            else [torch.zeros_like(sharded.local(p), dtype=self._storage_dtype(p)) for p in params]
        )
        call = forward or self._inner
        if self._heads is None:
            heads, head_label = [task_id], (lambda _head: "the task")

            def run_forward(x: Any, _head: int) -> Any:
                return call(x)
        else:
            heads, head_label, run_forward = list(range(task_id + 1)), "head {}".format, call

        def loss_for(head: int) -> Callable[[Any, Any], Tensor]:
            return loss_fn if head == task_id else _logit_sum

        prepare = prepare_batch or _mover(params[0].device)
        with preserved(self.model), wrapper_forward_refused(self.model, label):
            self.model.train(train_mode)
            if self._sharded:
                report = PassReport(
                    reason="FSDP2: one forward per head through the sharded model",
                    passes=len(heads),
                )
                group = sharded.process_group(params)
                with closing(
                    sharded.head_sums(
                        self.model,
                        params,
                        heads,
                        loader,
                        run_forward,
                        loss_for,
                        prepare,
                        label,
                        head_label,
                    )
                ) as passes:
                    for done in passes:
                        bad = sharded.importance_max_(self._ops, work, done.sums, group)
                        if bad:
                            self._nonfinite(
                                label,
                                head_label(done.head),
                                [names[i] for i in bad],
                                "on some rank (not traced to a batch under FSDP2)",
                                every_rank=True,
                            )
            else:
                engine = ImportancePass(
                    self._inner,
                    params,
                    self._partition.heads.values(),
                    heads,
                    loader,
                    run_forward,
                    loss_for,
                    prepare,
                    shared_forward=shared_forward,
                    memory_budget=memory_budget,
                    label=label,
                    head_label=head_label,
                )
                report = engine.report
                # Each head's sums are complete here; a DDP model's are summed over its ranks
                # (spg_fast._distributed).
                for done in summed_across_processes(
                    engine.run(), self.model, params, names, label, head_label
                ):
                    present = [i for i, h in enumerate(done.sums) if h is not None]
                    flags = self._ops.importance_max_(
                        [work[i] for i in present], [done.sums[i] for i in present]
                    )
                    if bool(flags.any()):
                        bad = [present[i] for i in flags.nonzero().flatten().tolist()]
                        self._nonfinite(
                            label, head_label(done.head), [names[i] for i in bad], _where(done)
                        )
        if self._sharded:
            work = [sharded.like(w, p) for w, p in zip(work, params, strict=True)]
        self._commit(dict(zip(shared, work, strict=True)), task_id + 1)
        return report

    @staticmethod
    def _nonfinite(
        label: str, head: str, names: list[str], where: str, every_rank: bool = False
    ) -> None:
        raise FloatingPointError(
            f"{label}non-finite gradient (NaN or Inf) for {head} in parameter(s) "
            f"{', '.join(names)}: {where}; every loss was finite, so the backward pass produced it "
            "(an overflow, or a hook or autograd function); the accumulated importance is "
            f"unchanged{' on every rank' if every_rank else ''}"
        )

    def _commit(self, importance: dict[str, Tensor], tasks_finished: int) -> None:
        """Install ``importance`` (by shared-parameter name) and what the mask derives from it.

        Once ``A`` exists, later commits copy into the same tensors (``A``, the mask factors, the
        head scale), so their data pointers never change: a step captured in a CUDA graph, or a
        cached launch plan, stays valid across tasks and checkpoint loads."""
        self._importance = _copied_into(self._importance, importance)
        values = list(self._importance.values())
        shards = [sharded.local(a) for a in values]
        self._factors = _copied_into(
            self._factors, dict(zip(importance, self._ops.mask_factors(shards), strict=True))
        )
        if not values:
            scale = None
        elif self._sharded:
            group = sharded.process_group(list(self._partition.shared.values()))
            scale = self._ops.head_scale(
                shards,
                numel=sum(a.numel() for a in values),
                reduce=lambda total: dist.all_reduce(total, group=group),
            )
        else:
            scale = self._ops.head_scale(values)
        self._head_scale = (
            scale
            if scale is None or self._head_scale is None or self._head_scale.dtype != scale.dtype
            else self._head_scale.copy_(scale)
        )
        self._tasks_finished = tasks_finished
        self._rebuild_slots()

    # ----------------------------------------------------------- checkpoints
    def state_dict(self, *, full: bool = False) -> dict[str, Any]:
        """Importance by shared-parameter name and the number of finished tasks;
        ``torch.load(weights_only=True)`` reads it back. The tensors are SPG's own (as
        ``nn.Module.state_dict`` gives its parameters), not copies.

        On an FSDP2 model the importance tensors are DTensors, each rank holding its shards (what
        ``torch.distributed.checkpoint`` saves; see ``spg_fast.checkpoint``); ``full=True`` gathers
        them into full tensors on every rank (a collective: call it on every rank), which a model
        that is not sharded loads."""
        importance = dict(self._importance)
        if full:
            importance = {
                n: a.full_tensor() if sharded.is_sharded(a) else a for n, a in importance.items()
            }
        return {
            "format": STATE_FORMAT,
            "tasks_finished": self._tasks_finished,
            "importance": importance,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore ``state_dict()`` output; every problem is reported at once and nothing changes
        on error.

        On an FSDP2 model every rank calls it, with full tensors (the same on every rank, as a
        loaded checkpoint is: each rank keeps its shard, without communication) or DTensors; the
        ranks agree before anything changes (one all-reduce), so a problem on one rank raises on
        every rank."""
        if not self._sharded:
            self._commit(*self._checked(state_dict))
            return
        error: Exception | None = None
        try:
            checked = self._checked(state_dict)
        except (
            TypeError,
            ValueError,
            RuntimeError,
        ) as exc:  # announced to the other ranks, then raised here
            error = exc
        params = list(self._partition.shared.values())
        failed = sharded.agree(
            [error is not None], sharded.process_group(params), sharded.local(params[0]).device
        )
        if error is not None:
            raise error
        if failed[0]:
            raise ValueError(
                f"SPG state dict does not match the model on {failed[0]} other rank(s) (see their "
                "errors); nothing was loaded on any rank"
            )
        self._commit(*checked)

    def _checked(self, state_dict: Mapping[str, Any]) -> tuple[dict[str, Tensor], int]:
        """The importance to install (laid out as the parameters) and the number of finished tasks
        from ``state_dict``, or the error naming every problem."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"SPG state dict must be a mapping, got {type(state_dict).__name__}")
        expected_keys = {"format", "tasks_finished", "importance"}
        if set(state_dict) != expected_keys:
            raise ValueError(
                f"SPG state dict must have keys {sorted(expected_keys)}, got {sorted(state_dict)}"
            )
        if state_dict["format"] != STATE_FORMAT:
            raise ValueError(
                f"SPG state dict format {state_dict['format']!r} is not "
                f"the supported {STATE_FORMAT}"
            )
        tasks = state_dict["tasks_finished"]
        if not isinstance(tasks, int) or isinstance(tasks, bool) or tasks < 0:
            raise ValueError(f"SPG state dict: tasks_finished must be an int >= 0, got {tasks!r}")
        saved = state_dict["importance"]
        if not isinstance(saved, Mapping):
            raise TypeError(
                f"SPG state dict: importance must be a mapping, got {type(saved).__name__}"
            )
        self._refresh_partition()
        shared = self._partition.shared
        if tasks == 0:
            if saved:
                raise ValueError("SPG state dict: tasks_finished is 0 but importance has entries")
            return {}, 0
        problems = []
        missing = [n for n in shared if n not in saved]
        extra = [n for n in saved if n not in shared]
        if missing:
            problems.append(f"missing importance for {', '.join(missing)}")
        if extra:
            problems.append(f"unexpected entries {', '.join(map(str, extra))}")
        laid_out = {}
        for name in shared.keys() & saved.keys():
            value, param = saved[name], shared[name]
            if not isinstance(value, Tensor) or not value.is_floating_point():
                problems.append(
                    f"{name}: expected a floating-point tensor, got "
                    f"{getattr(value, 'dtype', value)!r}"
                )
            elif value.shape != param.shape:
                problems.append(
                    f"{name}: shape {tuple(value.shape)} does not match the parameter's "
                    f"{tuple(param.shape)}"
                )
            elif sharded.is_sharded(value) and not self._sharded:
                problems.append(
                    f"{name}: a DTensor (a sharded model's state); this model is not sharded: save "
                    "it with state_dict(full=True)"
                )
            else:
                value = sharded.distribute(value, param) if self._sharded else value
                piece = sharded.local(value)
                if not bool(((piece >= 0) & (piece <= 1)).all()):
                    problems.append(
                        f"{name}: importance values must lie in [0, 1] (NaN is not allowed)"
                    )
                else:
                    copy = piece.to(
                        device=sharded.local(param).device,
                        dtype=self._storage_dtype(param),
                        copy=True,
                    )
                    laid_out[name] = sharded.like(copy, param) if self._sharded else copy
        if problems:
            raise ValueError("SPG state dict does not match the model: " + "; ".join(problems))
        return {n: laid_out[n] for n in shared}, tasks

    def _storage_dtype(self, param: Tensor) -> torch.dtype:
        return self._importance_dtype or compute_dtype(param.dtype)

    # ----------------------------------------------------------- integration
    def wrap(self, optimizer: torch.optim.Optimizer, *, mask: str = "gradient") -> SPGOptimizer:
        """A ``torch.optim.Optimizer`` that masks the gradients, then steps ``optimizer``
        (``mask="gradient"``, the paper's method); or steps it, then masks the parameter update it
        made (``mask="update"``: the step's change of each shared parameter times ``1 - A``, of each
        head times the head scale), which protects more under adaptive optimizers such as Adam,
        whose per-element normalisation undoes a gradient scale."""
        return SPGOptimizer(optimizer, self, mask=mask)

    @torch.no_grad()
    def mask_updates(self, params: Sequence[Tensor], before: Sequence[Tensor]) -> None:
        """``p <- before + (p - before) * mask`` for each parameter: soft-mask the update an
        optimizer step made (the masks of ``mask_gradients``); before the first ``end_task``
        nothing changes."""
        if self._head_scale is None:
            return
        shared, factors, heads = self.mask_split(list(params))
        start = dict(zip(map(id, params), before, strict=True))
        moved = [sharded.local(p) for p in (*shared, *heads)]
        origin = [sharded.local(start[id(p)]) for p in (*shared, *heads)]
        deltas = torch._foreach_sub(moved, origin)
        self._ops.soft_mask_(
            deltas[: len(shared)], factors, deltas[len(shared) :], self._head_scale
        )
        torch._foreach_add_(origin, deltas)
        torch._foreach_copy_(moved, origin)

    def attach(self, optimizer: torch.optim.Optimizer) -> AttachHandle:
        """Mask gradients before every ``optimizer.step()`` through a step pre-hook; returns a
        removable handle."""
        return attach(self, optimizer)


def _copied_into(current: dict[str, Tensor], new: dict[str, Tensor]) -> dict[str, Tensor]:
    """``new``'s values copied into ``current``'s tensors where both hold the same names, shapes,
    dtypes and devices (the tensors are reused); otherwise ``new`` itself."""
    same = current.keys() == new.keys() and all(
        current[n].shape == new[n].shape
        and current[n].dtype == new[n].dtype
        and current[n].device == new[n].device
        for n in new
    )
    if not same:
        return new
    for n, t in new.items():
        if current[n] is not t:
            current[n].copy_(t)
    return current


def _where(done: HeadSums) -> str:
    """Where a head's non-finite gradient sum came from, in words."""
    trace = done.nonfinite
    if trace is not None and trace.batch is not None:
        return f"first at batch {trace.batch} (counting from 0)"
    if trace is not None and trace.reproduced:
        return "every batch's gradient was finite, their sum overflowed"
    return "not traced to a batch (repeating the pass did not reproduce it)"


def _logit_sum(logits: Tensor, _target: Tensor) -> Tensor:
    return logits.sum()


def _mover(device: torch.device) -> Callable[[Any], tuple[Any, Tensor]]:
    def move(batch: Any) -> tuple[Any, Tensor]:
        if not isinstance(batch, tuple | list) or len(batch) != 2:
            raise TypeError(
                f"the loader yielded a {type(batch).__name__}, not an (x, y) pair; pass "
                "prepare_batch to turn its batches into (x, y)"
            )
        x, y = batch
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    return move
