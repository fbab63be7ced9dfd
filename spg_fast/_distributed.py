"""SPG across processes: the importance pass's per-head gradient sums combined over the ranks of a
DDP model.

Each rank runs the pass on the inner module over its own batches (no DDP reducer, no collective
during the pass), then, per head, one ``all_reduce`` of a flat buffer: every shared parameter's sum,
a touched count per parameter, and per rank a non-finite flag and a failure flag. Every rank so gets
the sums over all ranks' data (the spec's "Distributed data"; standardisation is scale-invariant, so
the number of batches per rank does not matter) and the same verdict: a non-finite gradient, or a
rank whose pass failed, raises on every rank before any importance changes. FSDP2 models (DTensor
parameters) take the path of ``spg_fast._sharded`` instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from spg_fast._importance_pass import HeadSums


def process_group(model: nn.Module) -> dist.ProcessGroup | None:
    """The process group whose ranks share ``model``'s importance: a DistributedDataParallel model's
    group when it has more than one rank; None (a single process) otherwise."""
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        return None
    group = model.process_group
    return group if dist.get_world_size(group) > 1 else None


@contextmanager
def wrapper_forward_refused(model: nn.Module, label: str = "") -> Iterator[None]:
    """While active, calling a DistributedDataParallel ``model`` raises: its forward prepares the
    reducer for a backward that the importance pass never runs, and may broadcast buffers (a
    collective that ranks with different numbers of batches would not match), so the pass must call
    the inner module."""
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        yield
        return

    def refuse(_module: nn.Module, _args: Any) -> None:
        raise RuntimeError(
            f"{label}the importance pass called the DistributedDataParallel wrapper; pass "
            "a forward that calls the inner module (ddp.module), or none for the default"
        )

    handle = model.register_forward_pre_hook(refuse)
    try:
        yield
    finally:
        handle.remove()


def summed_across_processes(
    heads: Iterator[HeadSums],
    group: dist.ProcessGroup | None,
    params: Sequence[Tensor],
    names: Sequence[str],
    label: str = "",
    head_label: Callable[[int], str] = "head {}".format,
) -> Iterator[HeadSums]:
    """``heads`` with each head's sums replaced by their sum over the ranks of ``group`` (``heads``
    itself for None, a single process). A local failure while computing a head is announced to the
    other ranks (one collective) before it propagates, so that they raise too instead of
    waiting."""
    if group is None or dist.get_world_size(group) == 1:
        yield from heads
        return
    combiner = _Combiner(group, params, names, label, head_label)
    while True:
        try:
            done = next(heads)
        except StopIteration:
            return
        except BaseException:
            combiner.announce_failure()
            raise
        yield combiner.combine(done)


class _Combiner:
    """The per-head all-reduce of one flat buffer:
    ``[sums..., touched per parameter, non-finite per rank, failed per rank]``, in the parameters'
    promoted dtype (at least float32; counts are exact below 2**24)."""

    def __init__(
        self,
        group: dist.ProcessGroup,
        params: Sequence[Tensor],
        names: Sequence[str],
        label: str,
        head_label: Callable[[int], str],
    ) -> None:
        self._group = group
        self._rank = dist.get_rank(group)
        self._world = dist.get_world_size(group)
        self._params = list(params)
        self._names = list(names)
        self._label = label
        self._head_label = head_label
        dtype = torch.float32
        for p in self._params:
            dtype = torch.promote_types(dtype, p.dtype)
        self._dtype = dtype
        self._sizes = [p.numel() for p in self._params]
        self._total = sum(self._sizes)
        self._device = self._params[0].device

    def _buffer(self) -> Tensor:
        return torch.zeros(
            self._total + len(self._params) + 2 * self._world,
            dtype=self._dtype,
            device=self._device,
        )

    def _reduce(self, flat: Tensor) -> tuple[Tensor, list[int], list[int]]:
        dist.all_reduce(flat, group=self._group)
        tail = flat[self._total + len(self._params) :].cpu()
        nonfinite = tail[: self._world].nonzero().flatten().tolist()
        failed = tail[self._world :].nonzero().flatten().tolist()
        return flat, nonfinite, failed

    def announce_failure(self) -> None:
        flat = self._buffer()
        flat[self._total + len(self._params) + self._world + self._rank] = 1
        self._reduce(flat)

    def combine(self, done: HeadSums) -> HeadSums:
        flat = self._buffer()
        sums = flat[: self._total].split(self._sizes)
        touched = flat[self._total : self._total + len(self._params)]
        present = [i for i, s in enumerate(done.sums) if s is not None]
        if present:
            torch._foreach_copy_(
                [sums[i] for i in present], [done.sums[i].reshape(-1) for i in present]
            )
            touched[present] = 1
        if done.first_nonfinite_batch is not None:
            flat[self._total + len(self._params) + self._rank] = 1
        flat, nonfinite, failed = self._reduce(flat)
        head = self._head_label(done.head)
        if failed:
            raise RuntimeError(
                f"{self._label}the importance pass failed on rank(s) {failed} while computing "
                f"{head} (see that rank's error); the accumulated importance is unchanged on "
                "every rank"
            )
        if nonfinite:
            bad = [self._names[i] for i, s in enumerate(sums) if not bool(torch.isfinite(s).all())]
            here = (
                ""
                if done.first_nonfinite_batch is None
                else f"; on this rank first at batch {done.first_nonfinite_batch} (counting from 0)"
            )
            raise FloatingPointError(
                f"{self._label}non-finite gradient (NaN or Inf) for {head} on rank(s) {nonfinite} "
                f"in parameter(s) {', '.join(bad) or '(cancelled out in the sum)'}{here}, although "
                "every loss was finite; the accumulated importance is unchanged on every rank"
            )
        got = touched.cpu().tolist()
        combined = [
            s.view(p.shape).to(p.dtype) if n > 0 else None
            for s, p, n in zip(sums, self._params, got, strict=True)
        ]
        return replace(done, sums=combined)
