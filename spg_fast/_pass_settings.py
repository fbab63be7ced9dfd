"""The settings ``SPG.end_task`` runs in, behind one interface: where each head's complete gradient
sums come from, and how they are folded into the stored keep factors.

- ``Replicated``: one process, or data-parallel replicas (DDP): the pass of
  ``spg_fast._importance_pass`` over this process's batches, each head's sums added over the
  processes (``spg_fast._distributed``), then ``Ops.accumulate_``.
- ``Sharded``: FSDP2 (``spg_fast._sharded``): each head's forward and backward through the sharded
  model, then ``Ops.moments`` of this rank's shards merged across the ranks and
  ``Ops.accumulate_with_`` the whole tensors' statistics.

``SPG.end_task`` orchestrates either the same way: for each head's sums, accumulate them; on a
non-finite gradient raise, naming where it came from (``where``), with the keep factors unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from typing import Any, Protocol

import torch.distributed as dist
from torch import Tensor, nn

from spg_fast import _sharded as sharded
from spg_fast._backend import Ops
from spg_fast._distributed import summed_across_processes
from spg_fast._importance_pass import HeadSums, ImportancePass, PassReport

Forward = Callable[[Any, int], Any]
LossFor = Callable[[int], Callable[[Any, Any], Tensor]]
Prepare = Callable[[Any], tuple[Any, Any]]


class PassSetting(Protocol):
    """One end-of-task pass in its setting."""

    report: PassReport
    every_rank: bool  # a failure is reported on every rank

    def head_sums(self) -> Iterator[HeadSums]:
        """Each head's complete gradient sums (over every process's data)."""
        ...

    def accumulate(self, ops: Ops, work: list[Tensor], done: HeadSums) -> list[int]:
        """Fold ``done`` into ``work``; the indices whose gradient is not finite (then ``work`` is
        unchanged)."""
        ...

    def where(self, done: HeadSums) -> str:
        """Where a non-finite gradient of ``done`` came from, in words."""
        ...


class Replicated:
    """One process, or replicas of the model whose processes each hold part of the data (DDP):
    the sums of the pass are added over ``group`` (None: one process)."""

    every_rank = False

    def __init__(
        self,
        engine: ImportancePass,
        group: dist.ProcessGroup | None,
        params: Sequence[Tensor],
        names: Sequence[str],
        label: str,
        head_label: Callable[[int], str],
    ) -> None:
        self._engine = engine
        self._group = group
        self._params = params
        self._names = names
        self._label = label
        self._head_label = head_label
        self.report = engine.report

    def head_sums(self) -> Iterator[HeadSums]:
        sums = self._engine.run()
        return summed_across_processes(
            sums, self._group, self._params, self._names, self._label, self._head_label
        )

    def accumulate(self, ops: Ops, work: list[Tensor], done: HeadSums) -> list[int]:
        present = [i for i, h in enumerate(done.sums) if h is not None]
        flags = ops.accumulate_([work[i] for i in present], [done.sums[i] for i in present])
        if not bool(flags.any()):
            return []
        return [present[i] for i in flags.nonzero().flatten().tolist()]

    def where(self, done: HeadSums) -> str:
        trace = done.nonfinite
        if trace is not None and trace.batch is not None:
            return f"first at batch {trace.batch} (counting from 0)"
        if trace is not None and trace.reproduced:
            return "every batch's gradient was finite, their sum overflowed"
        return "not traced to a batch (repeating the pass did not reproduce it)"


class Sharded:
    """FSDP2: every rank holds row shards of every parameter and of its keep factors."""

    every_rank = True

    def __init__(
        self,
        model: nn.Module,
        params: Sequence[Tensor],
        heads: Sequence[int],
        loader: Any,
        forward: Forward,
        loss_for: LossFor,
        prepare: Prepare,
        label: str,
        head_label: Callable[[int], str],
    ) -> None:
        self._args = (model, params, heads, loader, forward, loss_for, prepare, label, head_label)
        self._group = sharded.process_group(params)
        self.report = PassReport(
            reason="FSDP2: one forward per head through the sharded model", passes=len(heads)
        )

    def head_sums(self) -> Iterator[HeadSums]:
        with closing(sharded.head_sums(*self._args)) as passes:
            yield from passes

    def accumulate(self, ops: Ops, work: list[Tensor], done: HeadSums) -> list[int]:
        return sharded.accumulate_(ops, work, done.sums, self._group)

    def where(self, done: HeadSums) -> str:
        return "on some rank (not traced to a batch under FSDP2)"
