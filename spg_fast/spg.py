"""The SPG object: the accumulated importance of a model's shared parameters, stored as keep
factors, and the masking of optimizer steps with it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from spg_fast import _sharded as sharded
from spg_fast import storage
from spg_fast._backend import resolve_backend
from spg_fast._distributed import process_group, wrapper_forward_refused
from spg_fast._importance_pass import ImportancePass, PassProgress, PassReport
from spg_fast._model_state import preserved
from spg_fast._params import HeadSpec, inner_module, partition
from spg_fast._pass_settings import PassSetting, Replicated, Sharded
from spg_fast.mask_mode import MaskMode
from spg_fast.optimizer import AttachHandle, SPGOptimizer, _attach
from spg_fast.usage import Usage, usage

STATE_FORMAT = 2
# Format 1 held the importance ``A`` itself under "importance"; it still loads.
_STATE_KEYS = {
    1: {"format", "tasks_finished", "importance"},
    2: {"format", "tasks_finished", "keep"},
}


class SPG:
    """Parameter-level soft-masking (Konishi et al., ICML 2023) for one model trained on a sequence
    of tasks.

    After learning task ``k`` call ``end_task(k, loader)``: it measures how important every shared
    parameter element was and accumulates it into ``A``. From then on every optimizer step masked
    through ``wrap``, ``attach`` or ``spg_fast.optim`` moves each shared element ``1 - A`` as far
    as it would move unprotected, and each head ``1 - mean(A)`` as far (``spg_fast.mask_mode``:
    by masking the gradient or the update, whichever protects under the optimizer).

    Args:
        model: the network; it may be wrapped in DistributedDataParallel, ``nn.DataParallel`` or
            ``torch.compile`` (parameter names are those of the inner module either way), or
            sharded with FSDP2's ``fully_shard`` (then ``A`` is sharded like the parameters and
            ``end_task``, ``load_state_dict``, ``state_dict(full=True)`` and ``usage`` are
            collectives every rank calls).
        heads: the per-task head modules (modules of ``model``, or parameter-name prefixes); every
            other trainable parameter is shared. None (the default): a model without per-task
            heads (domain-incremental learning, continual fine-tuning), called as ``model(x)``,
            whose trainable parameters are all shared.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (``spg_fast._backend``).
        importance_dtype: how the keep factors ``1 - A`` are stored (``spg_fast.storage``):
            None or ``torch.float32`` (4 bytes per shared element; float64 for float64
            parameters), ``torch.bfloat16`` (2 bytes, relative error at most 2**-8) or
            ``torch.uint8`` (1 byte, relative error at most 1/16). No format rounds a keep factor
            above 0 to 0, so none freezes a parameter that float32 lets move.
    """

    def __init__(
        self,
        model: nn.Module,
        heads: HeadSpec | None = None,
        *,
        backend: str = "auto",
        importance_dtype: torch.dtype | None = None,
    ) -> None:
        storage.check_importance_dtype(importance_dtype)
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
        self._keep: dict[str, Tensor] = {}
        self._head_scale: Tensor | None = None
        self._slots: dict[Tensor, Tensor | None] = {}
        self._generation = 0
        self._rebuild_slots()

    # ------------------------------------------------------------------ views
    @property
    def backend(self) -> str:
        """Name of the backend running the tensor operations."""
        return self._ops.name

    @property
    def importance_dtype(self) -> torch.dtype | None:
        """The storage format of the keep factors, as given (``spg_fast.storage``)."""
        return self._importance_dtype

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
        """The shared parameters by name (those with an importance)."""
        return dict(self._partition.shared)

    @property
    def head_parameters(self) -> dict[str, nn.Parameter]:
        """The head parameters by name (scaled by the head scale)."""
        return dict(self._partition.heads)

    @property
    def importance(self) -> dict[str, Tensor]:
        """Accumulated importance ``A = 1 - keep`` by shared-parameter name, as new float32 tensors
        (float64 for float64 storage; shards on an FSDP2 model), decoded from the stored keep
        factors; empty before the first ``end_task``."""
        return {n: torch.rsub(self._decoded(k), 1) for n, k in self._keep.items()}

    @property
    def keep_factors(self) -> dict[str, Tensor]:
        """The stored keep factors ``1 - A`` by shared-parameter name: SPG's own tensors, in the
        storage format (``spg_fast.storage``); empty before the first ``end_task``."""
        return dict(self._keep)

    @staticmethod
    def _decoded(stored: Tensor) -> Tensor:
        if sharded.is_sharded(stored):
            return sharded.like(storage.decode(sharded.local(stored)), stored)
        return storage.decode(stored)

    @property
    def head_scale(self) -> Tensor | None:
        """``1 - mean(A)`` (a device scalar) that heads' gradients or updates are multiplied by;
        None before the first task."""
        return self._head_scale

    def usage(self) -> Usage:
        """How much of the network the importance has claimed: mean ``A`` and the fractions of
        shared elements with ``A`` above 0.5 and 0.9, overall and per shared parameter, and the
        head scale (``spg_fast.usage``). On an FSDP2 model a collective: call it on every rank."""
        shared = self._partition.shared
        numels = {n: p.numel() for n, p in shared.items()}
        importance = {n: 1 - storage.decode(sharded.local(k)) for n, k in self._keep.items()}
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
            replaced = sorted(n for n in old.keys() & new.keys() if old[n] is not new[n])
            raise ValueError(
                "the model's shared parameters changed after SPG was created (added: "
                f"{added or 'none'}, removed: {removed or 'none'}, replaced by other tensors: "
                f"{replaced or 'none'}); only heads may be added"
            )
        self._partition = fresh
        self._rebuild_slots()

    def _rebuild_slots(self) -> None:
        slots: dict[Tensor, Tensor | None] = {p: None for p in self._partition.heads.values()}
        for name, p in self._partition.shared.items():
            keep = self._keep.get(name)
            slots[p] = None if keep is None else sharded.local(keep)
        self._slots = slots
        self._generation += 1

    def _check_parameters(self, params: Iterable[Tensor], where: str) -> None:
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
                f"({described}{more}); SPG cannot mask them"
            )

    def _name_of(self, param: Tensor) -> str | None:
        return next((n for n, p in self._inner.named_parameters() if p is param), None)

    # -------------------------------------------------------------- masking
    def _keep_of(self, p: Tensor) -> Tensor | None:
        """The stored keep factors of parameter ``p`` (its local shard's; None for a head); picks
        up heads added since the last look."""
        if p not in self._slots:
            self._refresh_partition()
            if p not in self._slots:
                raise ValueError(
                    f"SPG: parameter {self._name_of(p) or tuple(p.shape)!r} is optimized but is "
                    "neither shared nor a head of the SPG model"
                )
        return self._slots[p]

    def _mask_split(
        self, params: Sequence[Tensor]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """``params`` split into the shared ones, their stored keep factors (local shards) and the
        heads, each in the given order; before the first ``end_task`` every parameter counts as a
        head (there are no keep factors, and ``head_scale`` is None: no mask). Cached while the same
        parameters are asked about and the mask is unchanged (``_generation``: a task ended, a
        checkpoint was loaded, a head was added), so a steady-state step does no per-parameter
        lookups."""
        ids = tuple(map(id, params))
        cached = self.__dict__.get("_mask_cache")
        if cached is not None and cached[0] == (ids, self._generation):
            return cached[1]
        shared, keeps, heads = [], [], []
        for p in params:
            keep = self._keep_of(p)
            if keep is None:
                heads.append(p)
            else:
                shared.append(p)
                keeps.append(keep)
        # Keyed after any refresh _keep_of made; the lists hold the parameters, so their ids stay
        # theirs while the entry lives.
        self._mask_cache = ((ids, self._generation), (shared, keeps, heads))
        return shared, keeps, heads

    @torch.no_grad()
    def mask_gradients(self, params: Iterable[Tensor] | None = None) -> None:
        """Soft-mask the gradients of ``params`` in place: the paper's rule, for a hand-written
        step (``wrap`` and ``attach`` do this for you, in the mode ``spg_fast.mask_mode`` picks).

        Args:
            params: the parameters whose ``.grad`` to mask (default: every shared and head
                parameter); those without a gradient are skipped.

        Shared gradients are multiplied by ``1 - A``, head gradients by ``1 - mean(A)``; before the
        first ``end_task`` nothing changes. No host synchronisation; the backend's launch is
        prepared once for the same parameters and reused while the mask is unchanged.
        """
        if self._head_scale is None:
            return
        present = [p for p in (self._slots if params is None else params) if p.grad is not None]
        sparse = next((p for p in present if p.grad.is_sparse), None)
        if sparse is not None:
            raise TypeError(
                f"SPG.mask_gradients: parameter {self._name_of(sparse)!r} has a sparse gradient, "
                "which SPG does not support"
            )
        shared, heads, masker = self._gradient_masker(present)
        masker(
            [sharded.local(p.grad) for p in shared],
            [sharded.local(p.grad) for p in heads],
            self._head_scale,
        )

    def _gradient_masker(
        self, params: list[Tensor]
    ) -> tuple[list[Tensor], list[Tensor], Callable[..., None]]:
        """``params`` split into shared ones and heads, and the backend's mask prepared for their
        gradients; cached with ``_mask_split``'s key (the same parameters, the same mask)."""
        key = (tuple(map(id, params)), self._generation)
        cached = self.__dict__.get("_masker_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        shared, keeps, heads = self._mask_split(params)
        local = [sharded.local(p) for p in shared], [sharded.local(p) for p in heads]
        entry = (shared, heads, self._ops.masker(local[0], keeps, local[1]))
        self._masker_cache = (key, entry)
        return entry

    def _update_masker(
        self, params: Sequence[Tensor], before: Sequence[Tensor]
    ) -> Callable[[], None]:
        """The update mask of the change an optimizer step makes to ``params``, prepared: calling
        it sets ``p <- before + keep * (p - before)`` for each parameter (heads: the head scale),
        where ``before`` (local shards: buffers the caller keeps and fills with the values before
        each step) may be overwritten. The caller caches it while ``_generation`` is unchanged;
        before the first ``end_task`` it does nothing."""
        if self._head_scale is None:
            return _nothing
        shared, keeps, heads = self._mask_split(list(params))
        start = dict(zip(map(id, params), before, strict=True))
        masker = self._ops.masker(
            [sharded.local(p) for p in shared],
            keeps,
            [sharded.local(p) for p in heads],
            [start[id(p)] for p in shared],
            [start[id(p)] for p in heads],
        )
        scale = self._head_scale
        return lambda: masker(None, None, scale)

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
        process_group: dist.ProcessGroup | None = None,
        progress: Callable[[PassProgress], object] | None = None,
    ) -> PassReport:
        """Measure the importance of the task just learned and accumulate it (the spec's
        end-of-task pass).

        For each head ``t`` in ``0..task_id`` the gradients of ``loss_fn(forward(x, t), y)`` (for
        ``t == task_id``) or ``forward(x, t).sum()`` (earlier heads) are summed over every batch
        of ``loader``; the importance of the task is the element-wise max over heads of
        ``|tanh(standardize(sum))|``, and ``A <- max(A, importance)``. Without per-task heads
        (``heads=None``) only the task's own loss ``loss_fn(forward(x), y)`` is measured.

        Args:
            task_id: the task just learned; tasks are ended in order, once each.
            loader: the task's training data, re-iterable (a DataLoader or a list of batches).
            forward: ``forward(x, head_id)`` (``forward(x)`` when ``heads=None``) returning the
                output ``loss_fn`` takes; default: the model without its DDP / ``torch.compile``
                wrapper (under DDP it must not call the DDP wrapper, whose forward takes part in
                collectives).
            loss_fn: ``loss_fn(output, y)``, a scalar tensor; default: cross-entropy.
            prepare_batch: turns what ``loader`` yields into ``(x, y)`` on the right device;
                default: move an ``(x, y)`` pair's tensors to the parameters' device.
            train_mode: run the model in train mode (dropout active, as the authors' code does).
            shared_forward: None (default) runs the model's shared part once per batch for all
                heads unless the forward draws random numbers, where each head gets its own
                forward as in the authors' code; True forces one forward per batch, False one per
                head (``spg_fast._importance_pass``). On an FSDP2 model each head gets its own
                forward through the sharded model, and True is refused.
            memory_budget: bytes the per-head gradient buffers may hold at once (default: a
                quarter of the free memory of the parameters' device).
            process_group: the processes that each hold part of the task's data while training
                replicas of the model (data parallelism without a DDP wrapper around ``model``,
                e.g. under a framework's strategy): each head's sums are added over them, so every
                process gets the importance of all the data. Default: the DDP wrapper's group when
                ``model`` is DistributedDataParallel, else this process alone. An FSDP2 model
                always uses its mesh's group.
            progress: called with a ``PassProgress`` (head, heads done of all, batch of batches,
                passes over the data) after every batch of every pass over the data, e.g. to drive
                a progress bar; not called on an FSDP2 model.

        Returns:
            What the pass did (``PassReport``).

        The model is left as it was found, on success and on error: parameters, buffers (BatchNorm
        running statistics), each module's train/eval mode and ``.grad``. On any error the
        accumulated importance is left exactly as it was; a non-finite loss is reported with its
        head and batch, a non-finite gradient with its head, parameters and first batch.
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
        call = forward or self._inner
        if self._heads is None:
            heads, head_label = [task_id], (lambda _head: "the task")

            def run_forward(x: Any, _head: int) -> Any:
                return call(x)
        else:
            heads, head_label, run_forward = list(range(task_id + 1)), "head {}".format, call

        def loss_for(head: int) -> Callable[[Any, Any], Tensor]:
            return loss_fn if head == task_id else _logit_sum

        prepare = prepare_batch or _mover(sharded.local(params[0]).device)
        work = [sharded.local(self._stored_like(n, p)).clone() for n, p in shared.items()]
        setting: PassSetting
        if self._sharded:
            setting = Sharded(
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
                progress=progress,
            )
            group = process_group if process_group is not None else _default_group(self.model)
            setting = Replicated(engine, group, params, names, label, head_label)
        with preserved(self.model), wrapper_forward_refused(self.model, label):
            self.model.train(train_mode)
            for done in setting.head_sums():
                bad = setting.accumulate(self._ops, work, done)
                if bad:
                    raise _nonfinite(
                        label, head_label(done.head), [names[i] for i in bad], setting, done
                    )
        if self._sharded:
            work = [sharded.like(w, p) for w, p in zip(work, params, strict=True)]
        self._commit(dict(zip(shared, work, strict=True)), task_id + 1)
        return setting.report

    def _stored_like(self, name: str, param: Tensor) -> Tensor:
        """The stored keep factors of ``name``, or fresh ones (keep 1) laid out as ``param``."""
        if name in self._keep:
            return self._keep[name]
        local = sharded.local(param)
        fresh = storage.fresh(local.shape, self._stored_dtype(param), local.device)
        return sharded.like(fresh, param) if self._sharded else fresh

    def _commit(self, keep: dict[str, Tensor], tasks_finished: int) -> None:
        """Install the stored keep factors ``keep`` (by shared-parameter name; DTensors on an FSDP2
        model) and the head scale derived from them.

        Once keep factors exist, later commits copy into the same tensors (and the head scale), so
        their data pointers never change: a step captured in a CUDA graph, or a launch plan, stays
        valid across tasks and checkpoint loads."""
        self._keep = _copied_into(self._keep, keep)
        values = list(self._keep.values())
        shards = [sharded.local(k) for k in values]
        if not values:
            scale = None
        elif self._sharded:
            group = sharded.process_group(list(self._partition.shared.values()))
            scale = self._ops.head_scale(
                shards,
                numel=sum(k.numel() for k in values),
                reduce=lambda total: dist.all_reduce(total, group=group),
            )
        else:
            scale = self._ops.head_scale(values)
        current = self._head_scale
        if scale is not None and current is not None and current.dtype == scale.dtype:
            scale = current.copy_(scale)
        self._head_scale = scale
        self._tasks_finished = tasks_finished
        self._rebuild_slots()

    # ----------------------------------------------------------- checkpoints
    def state_dict(self, *, full: bool = False) -> dict[str, Any]:
        """SPG's state: the stored keep factors by shared-parameter name, their format and the
        number of finished tasks; ``torch.load(weights_only=True)`` reads it back.

        Args:
            full: on an FSDP2 model, gather the sharded keep factors into full tensors on every
                rank (a collective: call it on every rank), which a model that is not sharded
                loads. Without it the tensors are SPG's own (DTensors on an FSDP2 model: what
                ``torch.distributed.checkpoint`` saves, see ``spg_fast.checkpoint``), not copies.

        Returns:
            ``{"format": 2, "tasks_finished": int, "keep": {name: tensor}}``.
        """
        keep = dict(self._keep)
        if full:
            keep = {n: k.full_tensor() if sharded.is_sharded(k) else k for n, k in keep.items()}
        return {"format": STATE_FORMAT, "tasks_finished": self._tasks_finished, "keep": keep}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore ``state_dict()`` output (format 2, in any storage format: it is converted to this
        SPG's; or format 1, which held ``A``); every problem is reported at once and nothing
        changes on error.

        On an FSDP2 model every rank calls it, with full tensors (the same on every rank, as a
        loaded checkpoint is: each rank keeps its shard, without communication) or DTensors; the
        ranks agree before anything changes (one all-reduce), so a problem on one rank raises on
        every rank.

        Args:
            state_dict: ``{"format", "tasks_finished", "keep"}`` as ``state_dict()`` returns it
                (format 1: ``"importance"`` in place of ``"keep"``).

        Raises:
            TypeError: ``state_dict`` or its ``"keep"`` is not a mapping.
            ValueError: an unknown format, other keys, a bad ``tasks_finished``, or (every one of
                them named at once) missing or unknown parameter names, tensors that do not fit
                their parameters, keep factors outside [0, 1] or NaN.
        """
        if not self._sharded:
            self._commit(*self._checked(state_dict))
            return
        error: Exception | None = None
        try:
            checked = self._checked(state_dict)
        except (TypeError, ValueError, RuntimeError) as exc:  # announced to the other ranks first
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
        """The keep factors to install (stored as this SPG stores them, laid out as the parameters)
        and the number of finished tasks from ``state_dict``, or the error naming every problem."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"SPG state dict must be a mapping, got {type(state_dict).__name__}")
        version = state_dict.get("format")
        if version not in _STATE_KEYS:
            raise ValueError(
                f"SPG state dict format {version!r} is not a supported one "
                f"({', '.join(map(str, _STATE_KEYS))})"
            )
        expected = _STATE_KEYS[version]
        if set(state_dict) != expected:
            raise ValueError(
                f"SPG state dict must have keys {sorted(expected)}, got {sorted(state_dict)}"
            )
        tasks = state_dict["tasks_finished"]
        if not isinstance(tasks, int) or isinstance(tasks, bool) or tasks < 0:
            raise ValueError(f"SPG state dict: tasks_finished must be an int >= 0, got {tasks!r}")
        entry = "importance" if version == 1 else "keep"
        saved = state_dict[entry]
        if not isinstance(saved, Mapping):
            raise TypeError(
                f"SPG state dict: {entry} must be a mapping, got {type(saved).__name__}"
            )
        self._refresh_partition()
        shared = self._partition.shared
        if tasks == 0:
            if saved:
                raise ValueError(f"SPG state dict: tasks_finished is 0 but {entry} has entries")
            return {}, 0
        problems = []
        missing = [n for n in shared if n not in saved]
        extra = [n for n in saved if n not in shared]
        if missing:
            problems.append(f"missing {entry} for {', '.join(missing)}")
        if extra:
            problems.append(f"unexpected entries {', '.join(map(str, extra))}")
        laid_out = {}
        for name in shared.keys() & saved.keys():
            value, param = saved[name], shared[name]
            why = _problem(value, param, version, self._sharded)
            if why:
                problems.append(f"{name}: {why}")
                continue
            piece = sharded.local(sharded.distribute(value, param) if self._sharded else value)
            keep = 1 - piece.to(torch.float64) if version == 1 else storage.decode(piece)
            if not bool(((keep >= 0) & (keep <= 1)).all()):
                what = "importance" if version == 1 else "keep factor"
                problems.append(f"{name}: {what} values must lie in [0, 1] (NaN is not allowed)")
                continue
            stored = storage.encode(keep, self._stored_dtype(param))
            stored = stored.to(sharded.local(param).device)
            laid_out[name] = sharded.like(stored, param) if self._sharded else stored
        if problems:
            raise ValueError("SPG state dict does not match the model: " + "; ".join(problems))
        return {n: laid_out[n] for n in shared}, tasks

    def _stored_dtype(self, param: Tensor) -> torch.dtype:
        return storage.stored_dtype(param.dtype, self._importance_dtype)

    # ----------------------------------------------------------- integration
    def wrap(self, optimizer: torch.optim.Optimizer, *, mask: MaskMode = "auto") -> SPGOptimizer:
        """A ``torch.optim.Optimizer`` that steps ``optimizer`` with SPG's mask.

        Args:
            optimizer: any ``torch.optim`` optimizer over parameters of this SPG's model.
            mask: ``"auto"`` (the default), ``"gradient"`` or ``"update"``
                (``spg_fast.mask_mode``).

        Returns:
            An ``SPGOptimizer`` sharing ``optimizer``'s param groups and state.
        """
        return SPGOptimizer(optimizer, self, mask=mask)

    def attach(self, optimizer: torch.optim.Optimizer, *, mask: MaskMode = "auto") -> AttachHandle:
        """Make ``optimizer.step()`` itself apply SPG's mask, through torch's step pre- and
        post-hooks, leaving the optimizer object as it is (for frameworks that own the optimizer).

        Args:
            optimizer: any ``torch.optim`` optimizer over parameters of this SPG's model.
            mask: as for ``wrap``.

        Returns:
            A handle whose ``remove()`` stops the masking (also a context manager).
        """
        return _attach(self, optimizer, mask=mask)


def _default_group(model: nn.Module) -> dist.ProcessGroup | None:
    return process_group(model)


def _problem(value: Any, param: Tensor, version: int, is_sharded: bool) -> str | None:
    """What is wrong with a saved entry for ``param``, or None."""
    if not isinstance(value, Tensor):
        return f"expected a tensor, got {type(value).__name__}"
    if version == 1 and not value.is_floating_point():
        return f"expected a floating-point importance tensor, got {value.dtype}"
    if version == 2 and value.dtype not in storage.RELATIVE_ERROR:
        return f"keep factors stored as {value.dtype}, not a storage format of spg_fast.storage"
    if value.shape != param.shape:
        return f"shape {tuple(value.shape)} does not match the parameter's {tuple(param.shape)}"
    if sharded.is_sharded(value) and not is_sharded:
        return (
            "a DTensor (a sharded model's state); this model is not sharded: save it with "
            "state_dict(full=True)"
        )
    return None


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


def _nonfinite(
    label: str, head: str, names: list[str], setting: PassSetting, done: Any
) -> FloatingPointError:
    every = " on every rank" if setting.every_rank else ""
    return FloatingPointError(
        f"{label}non-finite gradient (NaN or Inf) for {head} in parameter(s) {', '.join(names)}: "
        f"{setting.where(done)}; every loss was finite, so the backward pass produced it (an "
        f"overflow, or a hook or autograd function); the accumulated importance is unchanged{every}"
    )


def _nothing() -> None:
    return None


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
