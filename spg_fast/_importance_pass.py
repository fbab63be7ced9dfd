"""SPG's end-of-task pass: for each head, the gradient of its loss with respect to the shared
parameters, summed over every batch of the task's data.

Two schedules compute the same sums:
- **per-head passes** (the authors' procedure): one pass over the data per head, a fresh forward for
  every head and batch;
- **shared forward**: the heads in groups, one pass over the data per group; in each batch the
  shared part of the model runs once and each head's gradient is taken from that one graph
  (``spg_fast._shared_forward.SharedForward``: the heads evaluated on the input captured from the
  first head's forward where that is verified on the first batch, else the memoised trunk
  submodules; ``PassReport.strategy`` and ``fallback`` tell which, and why). A group holds as many
  heads as their gradient buffers fit in ``memory_budget`` bytes (default: a quarter of the memory
  free on the parameters' device when the pass starts; one head per group where that cannot be
  told).

By default (``shared_forward=None``) the shared forward is used unless the model draws random
numbers in its forward (dropout in train mode; ``spg_fast._randomness``): there the authors draw
fresh masks for every head, so the per-head passes are kept. ``shared_forward=True`` forces the
shared forward (all heads of a batch then see the same random draws), ``False`` the per-head passes.

Gradients are taken with ``torch.autograd.grad`` into the pass's own buffers, one per head and
shared parameter: ``.grad`` is never read or written, so post-accumulate-grad hooks and DDP's
reducer are not involved. From a head's second batch on, a tensor hook (``_AddingHooks``) adds each
gradient into its buffer as backward produces it. ``ImportancePass.run`` yields each head's sums
once they are complete and before anything turns them into importance: the one place where a
distributed run would combine them across processes.

Per pass over the data, the losses of every batch and then the sums are checked for NaN and Inf (one
host synchronisation each); gradients are not checked batch by batch. When a head's sums are not
finite although every loss was, the pass is repeated with the random generators as they were,
checking every batch's gradient, and ``HeadSums.nonfinite`` tells the batch (a ``Trace``).

``progress``, when given, is called with a ``PassProgress`` after every batch of every pass over the
data (the repeats included).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from spg_fast._device_memory import free_bytes
from spg_fast._randomness import (
    generator_states,
    random_modules,
    restore_generator_states,
    watch_draws,
)
from spg_fast._shared_forward import SharedForward

# The default memory budget for the head buffers, as a fraction of the free memory when the pass
# starts: the rest is left to the batch's activations (held across the group's heads) and to
# whatever else the process allocates.
DEFAULT_BUDGET_FRACTION = 0.25

LossFn = Callable[[Any, Any], Tensor]


@dataclass(frozen=True)
class HeadSums:
    """The complete gradient sums of one head: per shared parameter (in the pass's order), or None
    where no batch gave that parameter a gradient; ``batches`` is the number of batches summed;
    ``nonfinite`` is None when every sum is finite, else where the NaN or Inf came from. The sums
    are the pass's own tensors; let go of them before asking for the next group's heads, so that the
    memory held stays within the budget."""

    head: int
    sums: list[Tensor | None]
    batches: int
    nonfinite: Trace | None = None

    @property
    def first_nonfinite_batch(self) -> int | None:
        """The first batch whose gradient held a NaN or Inf; None when none did (the sums may still
        be non-finite when they overflowed, or when the batch could not be traced)."""
        return None if self.nonfinite is None else self.nonfinite.batch


@dataclass(frozen=True)
class Trace:
    """Where a head's non-finite gradient sum came from, found by repeating its pass with the random
    generators as they were and checking every batch. ``reproduced``: the repeat gave the same
    losses and again a non-finite sum; then ``batch`` is the first batch whose gradient held a NaN
    or Inf, or None when every batch's gradient was finite (the sum over the batches overflowed)."""

    batch: int | None
    reproduced: bool


@dataclass(frozen=True)
class _Group:
    """One pass over the data as it ran: its heads, whether it shared the forward, the random
    generators' states before it and its losses (heads x batches), so that it can be repeated and
    the repeat compared."""

    heads: list[int]
    share: bool
    generators: list[Tensor]
    losses: Tensor


class _PassResult(NamedTuple):
    heads: list[int]
    sums: list[list[Tensor | None]]
    losses: Tensor
    drew: bool
    first_bad: list[int | None]


@dataclass
class PassReport:
    """What the pass did, for tests and benchmarks: whether it shared the forward, why, and how
    many heads went into a group; ``strategy`` is how the forward was shared (``"per-head
    forwards"``: not shared; ``"head capture"``: the heads evaluated on the input captured from the
    first head's forward; ``"trunk memo"``: the trunk submodules' calls memoised) and ``fallback``
    why the head capture was not used (or, for some batches, not); ``memo_hits`` counts the shared
    modules' calls answered from the memo, ``captured`` the heads evaluated on a captured input."""

    shared_forward: bool = False
    reason: str = ""
    group_size: int = 1
    passes: int = 0
    memo_hits: int = 0
    strategy: str = "per-head forwards"
    fallback: str = ""
    captured: int = 0


@dataclass(frozen=True)
class PassProgress:
    """Where the pass stands, given to ``progress`` after every batch of every pass over the data:
    ``head`` is the head whose batch just finished (for a group, its last head), ``heads_done`` the
    heads whose sums are complete so far of the ``heads`` of this pass, ``batch`` the batches done
    in the current pass over the data (from 1) of ``batches`` (``len(loader)``, None when the loader
    has no length), ``passes`` the passes over the data started so far (repeats that trace a
    non-finite gradient included)."""

    head: int
    heads_done: int
    heads: int
    batch: int
    batches: int | None
    passes: int


class ImportancePass:
    """The pass over ``loader`` for ``heads`` of ``model``; see the module docstring.

    ``params`` are the shared parameters whose gradients are summed; ``head_params`` tell the shared
    forward which modules are heads. ``forward(x, head)`` gives a head's output and
    ``loss_for(head)`` the loss function applied to ``(output, y)``; ``prepare_batch`` turns a
    loader item into ``(x, y)``. ``label`` starts error messages, ``head_label(head)`` names a head
    in them.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Sequence[Tensor],
        head_params: Iterable[Tensor],
        heads: Sequence[int],
        loader: Iterable[Any],
        forward: Callable[[Any, int], Any],
        loss_for: Callable[[int], LossFn],
        prepare_batch: Callable[[Any], tuple[Any, Any]],
        *,
        shared_forward: bool | None = None,
        memory_budget: int | None = None,
        label: str = "",
        head_label: Callable[[int], str] = "head {}".format,
        progress: Callable[[PassProgress], object] | None = None,
    ) -> None:
        if shared_forward not in (None, True, False):
            raise TypeError(
                f"shared_forward must be None (auto), True or False, got {shared_forward!r}"
            )
        if memory_budget is not None and (
            isinstance(memory_budget, bool)
            or not isinstance(memory_budget, int)
            or memory_budget < 0
        ):
            raise ValueError(
                f"memory_budget must be None or a number of bytes >= 0, got {memory_budget!r}"
            )
        if not heads:
            raise ValueError("the importance pass needs at least one head")
        self._model = model
        self._params = list(params)
        self._head_params = list(head_params)
        self._heads = list(heads)
        self._loader = loader
        self._forward = forward
        self._loss_for = loss_for
        self._prepare = prepare_batch
        self._shared_forward = shared_forward
        self._budget = memory_budget
        self._label = label
        self._head_label = head_label
        self._progress = progress
        self._batches = _length(loader)
        self._device = self._params[0].device
        self.report = PassReport()
        # For progress: heads whose sums are complete, passes over the data started.
        self._heads_done = 0
        self._passes_started = 0

    # ------------------------------------------------------------- planning
    def _bytes_per_head(self) -> int:
        return sum(p.numel() * p.element_size() for p in self._params)

    def _group_size(self) -> int:
        budget = self._budget
        if budget is None:
            free = free_bytes(self._device)
            budget = 0 if free is None else int(free * DEFAULT_BUDGET_FRACTION)
        return max(1, min(len(self._heads), budget // max(1, self._bytes_per_head())))

    def _decide(self) -> bool | None:
        """True or False when the schedule is settled before the pass; None: share unless the first
        forward draws random numbers."""
        report = self.report
        if len(self._heads) == 1:
            report.reason = "one head"
            return False
        if self._shared_forward is not None:
            report.reason = "forced by shared_forward"
            return self._shared_forward
        found = random_modules(self._model)
        if found:
            report.reason = (
                "random modules in train mode "
                f"({', '.join(found[:3])}{', ...' if len(found) > 3 else ''})"
            )
            return False
        return None

    # ---------------------------------------------------------------- the pass
    def run(self) -> Iterator[HeadSums]:
        """Yield each head's complete sums, heads in order; raise on an empty loader or a
        non-finite loss."""
        report = self.report
        share = self._decide()
        size = 1 if share is False else self._group_size()
        if size == 1 and share is not False:
            share, report.reason = False, "the memory budget holds one head's gradient buffers"
        report.group_size = size
        self._heads_done = self._passes_started = 0
        start = 0
        while start < len(self._heads):
            group = self._heads[start : start + size]
            probing = share is None
            generators = generator_states(self._device)
            shared = share is not False and len(group) > 1
            result = self._pass(group, shared, probing)
            report.passes += 1
            self._heads_done += len(result.heads)
            if probing:
                share = not result.drew
                report.reason = (
                    "the first forward drew random numbers"
                    if result.drew
                    else "no random draws in the first forward"
                )
                if result.drew:
                    size = report.group_size = 1
            report.shared_forward = bool(share)
            traces = self._traces(
                _Group(result.heads, shared and not result.drew, generators, result.losses),
                result.sums,
            )
            for j, head in enumerate(result.heads):
                yield HeadSums(head, result.sums[j], result.losses.shape[1], traces[j])
            start += len(result.heads)
            del result  # the group's sums, before the next group allocates its own

    def _traces(self, group: _Group, sums: list[list[Tensor | None]]) -> list[Trace | None]:
        """Per head of ``group``, None when its sums are finite (one host synchronisation for the
        group); for the others, the pass repeated with the random generators as they were, checking
        every batch."""
        finite = self._finite(sums)
        if all(finite):
            return [None] * len(group.heads)
        state = generator_states(self._device)
        restore_generator_states(self._device, group.generators)
        try:
            again = self._pass(group.heads, group.share, probe=False, trace=True)
        except ValueError:  # the loader could not be iterated again
            again = None
        finally:
            restore_generator_states(self._device, state)
        if again is None or not torch.equal(again.losses, group.losses):
            return [None if ok else Trace(None, False) for ok in finite]
        repeated = self._finite(again.sums)
        traces: list[Trace | None] = []
        for j, ok in enumerate(finite):
            if ok:
                traces.append(None)
            elif repeated[j]:  # the repeat's sums were finite: it did not reproduce the pass
                traces.append(Trace(None, False))
            else:
                traces.append(Trace(again.first_bad[j], True))
        return traces

    def _finite(self, sums: list[list[Tensor | None]]) -> list[bool]:
        """Per head, whether every sum is finite; one host synchronisation."""
        return torch.stack(
            [_all_finite([t for t in row if t is not None], self._device) for row in sums]
        ).tolist()

    @torch.enable_grad()
    def _pass(self, group: list[int], share: bool, probe: bool, trace: bool = False) -> _PassResult:
        """One pass over the data for ``group``: the heads completed (only the first when the
        probe saw random draws), their sums, the losses, whether the probe saw draws and, when
        tracing, per head the first batch whose gradient was not finite. Raises on a non-finite
        loss unless tracing."""
        sums: list[list[Tensor | None]] = [[None] * len(self._params) for _ in group]
        losses: list[list[Tensor]] = [[] for _ in group]
        finite: list[list[Tensor]] = [[] for _ in group]
        drew = False
        batches = 0
        self._passes_started += 1
        with ExitStack() as stack:
            shared = (
                stack.enter_context(
                    SharedForward(self._model, self._head_params, group, self._device)
                )
                if share
                else None
            )
            # Tracing needs every batch's gradients back from autograd.grad; otherwise hooks add
            # them as produced.
            adding = None if trace else stack.enter_context(_AddingHooks(self._params))
            for batch, final in _marked_last(self._loader):
                x, y = self._prepare(batch)
                for j, head in enumerate(group):
                    last = j == len(group) - 1
                    forward = functools.partial(self._forward, x, head)
                    if shared is not None:
                        forward = functools.partial(shared.output, batches, j, forward)
                    if probe and batches == 0 and j == 0:
                        with watch_draws(self._device) as watch:
                            out = forward()
                        if watch.drew:
                            # Fall back to per-head passes; this head's first forward is the one it
                            # would have had.
                            drew, last, group = True, True, group[:1]
                            stack.close()
                            shared = None
                    else:
                        out = forward()
                    loss = self._loss(head, batches, out, y)
                    if adding is not None:
                        adding.sums = sums[j]
                    grads = torch.autograd.grad(
                        loss, self._params, retain_graph=not last, allow_unused=True
                    )
                    if adding is not None:
                        grads = adding.not_added(grads)
                    present = _accumulate(sums[j], grads)
                    losses[j].append(loss.detach())
                    if trace:
                        finite[j].append(_all_finite(present, self._device))
                    if last:
                        break
                if shared is not None:
                    shared.end_batch()
                batches += 1
                if self._progress is not None:
                    done = self._heads_done + (len(group) if final and not trace else 0)
                    self._progress(
                        PassProgress(
                            group[-1],
                            done,
                            len(self._heads),
                            batches,
                            self._batches,
                            self._passes_started,
                        )
                    )
            if shared is not None and not trace:
                self._record(shared)
        if batches == 0:
            raise ValueError(
                f"{self._label}the loader yielded no batches: the importance pass needs the task's "
                "training data (a re-iterable loader such as a DataLoader or a list, not a spent "
                "iterator)"
            )
        group_losses = torch.stack([torch.stack(row) for row in losses[: len(group)]])
        if not trace:
            self._check_losses(group, group_losses)
        first_bad = [
            next((b for b, ok in enumerate(row) if not bool(ok)), None)
            for row in finite[: len(group)]
        ]
        return _PassResult(group, sums[: len(group)], group_losses, drew, first_bad)

    def _record(self, shared: SharedForward) -> None:
        """Add a shared pass's strategy and counts to the report (the trunk memo, once any group
        fell back to it)."""
        report = self.report
        if report.strategy != "trunk memo":
            report.strategy = shared.strategy
        report.fallback = report.fallback or shared.fallback
        report.memo_hits += shared.memo_hits
        report.captured += shared.captured

    def _loss(self, head: int, batch: int, out: Any, y: Any) -> Tensor:
        return checked_loss(
            self._loss_for(head)(out, y), self._head_label(head), batch, self._label
        )

    def _check_losses(self, group: list[int], losses: Tensor) -> None:
        """Raise on the first batch whose loss is NaN or Inf, naming it and the heads concerned."""
        bad = ~torch.isfinite(losses)
        if bool(bad.any()):
            batch = int(bad.any(0).nonzero()[0])
            heads = ", ".join(
                self._head_label(group[j]) for j in bad[:, batch].nonzero().flatten().tolist()
            )
            raise FloatingPointError(
                f"{self._label}the loss is non-finite (NaN or Inf) at batch {batch} (counting "
                f"from 0) for {heads}; check that batch's data and the loss function"
            )


def checked_loss(loss: Any, head: str, batch: int, label: str = "") -> Tensor:
    """``loss`` (of ``head`` at ``batch``) if it is a scalar tensor that depends on a trainable
    parameter; else a ``ValueError`` saying which it is not."""
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        got = f"shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(
            f"{label}the importance-pass loss for {head} must be a scalar tensor, got {got} "
            f"(batch {batch})"
        )
    if not loss.requires_grad:
        raise ValueError(
            f"{label}the loss for {head} at batch {batch} does not depend on any trainable "
            "parameter (was the output computed under torch.no_grad() or detached?)"
        )
    return loss


def _length(loader: Iterable[Any]) -> int | None:
    """``len(loader)``, or None when it has none (an iterator; a DataLoader over an iterable
    dataset without a length)."""
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def _marked_last(items: Iterable[Any]) -> Iterator[tuple[Any, bool]]:
    """Each item of ``items`` with whether it is the last (one item read ahead)."""
    iterator = iter(items)
    try:
        held = next(iterator)
    except StopIteration:
        return
    for item in iterator:
        yield held, False
        held = item
    yield held, True


def _all_finite(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    """A device bool: whether every value of ``tensors`` is finite, from their extremes (exact,
    unlike a norm, which can overflow for finite values)."""
    extremes = [torch.stack(torch.aminmax(t)) for t in tensors if t.numel()]
    if not extremes:
        return torch.ones((), dtype=torch.bool, device=device)
    return torch.isfinite(torch.cat(extremes)).all()


class _AddingHooks:
    """Tensor hooks on the shared parameters that add each gradient into its head's sum (``sums``,
    set before each ``torch.autograd.grad``) the moment backward produces it, once that sum exists,
    and hand autograd a zero (an expanded scalar, no memory) in its place. The gradient's memory is
    then freed while backward runs, as ``AccumulateGrad`` frees it for ``.grad``, instead of a whole
    gradient set being held until autograd.grad returns and added afterwards: one gradient set less
    at the peak, and on the CPU a measured 12% off the AlexNet pass (fresh allocations every batch
    page-faulted 70k times per pass, against 14k). The additions are the same, in the same order, as
    adding the returned gradients. Sparse gradients and first gradients (which ``_accumulate`` may
    keep as the sum) pass through to ``torch.autograd.grad``'s result."""

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.sums: list[Tensor | None] = [None] * len(params)
        self._added = [False] * len(params)
        self._zeros = [torch.zeros((), dtype=p.dtype, device=p.device) for p in params]
        self._handles = [
            p.register_hook(functools.partial(self._hook, i))
            for i, p in enumerate(params)
            if p.requires_grad
        ]

    def __enter__(self) -> _AddingHooks:
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()

    def _hook(self, i: int, grad: Tensor) -> Tensor | None:
        total = self.sums[i]
        if total is None or grad.layout != torch.strided:
            return None
        total.add_(grad)
        self._added[i] = True
        return self._zeros[i].expand(grad.shape)

    def not_added(self, grads: Sequence[Tensor | None]) -> list[Tensor | None]:
        """``grads`` (what autograd.grad returned) with None for those the hooks already added;
        resets the record."""
        out = [None if added else g for g, added in zip(grads, self._added, strict=True)]
        self._added = [False] * len(self._added)
        return out


def _accumulate(sums: list[Tensor | None], grads: Sequence[Tensor | None]) -> list[Tensor]:
    """Add one batch's gradients into a head's sums; returns the gradients present (sparse ones as
    their values).

    A parameter's first gradient is copied into its sum, never kept as it: autograd may return a
    tensor that something else holds (a custom function's or a hook's cached gradient; the same
    tensor for two parameters), which later batches must not be added into."""
    add_to, add_from, present = [], [], []
    for i, g in enumerate(grads):
        if g is None:
            continue
        if g.layout != torch.strided:
            sums[i] = g.to_dense() if sums[i] is None else sums[i].add_(g)
            present.append(g.coalesce().values())
            continue
        present.append(g)
        if sums[i] is not None:
            add_to.append(sums[i])
            add_from.append(g)
        else:
            sums[i] = g.clone(memory_format=torch.contiguous_format)
    if add_to:
        torch._foreach_add_(add_to, add_from)
    return present
