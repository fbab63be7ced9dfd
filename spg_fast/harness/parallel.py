"""The harness over several processes (torchrun): the process group's lifetime, each rank's share of
every batch, the model's wrapper (DistributedDataParallel or FSDP2 ``fully_shard``), sums over
ranks, and rank 0's file work, whose outcome every rank learns so that none goes on alone into a
collective and waits forever.

Every rank takes its contiguous share of each global mini-batch and divides its summed loss by the
batch's size over the number of ranks; DDP and FSDP2 average the ranks' gradients, which gives the
whole batch's mean gradient, as one process computes it, up to float rounding."""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from spg_fast import _sharded as sharded

WRAPPERS = ("ddp", "fsdp")

T = TypeVar("T")


def launched_world_size() -> int:
    """The number of processes torchrun started (its ``WORLD_SIZE``; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextmanager
def process_group(device: str) -> Iterator[str]:
    """Under torchrun with more than one process: the default process group (gloo on the CPU, nccl
    on CUDA), torn down on exit, on error too. Yields the device this process uses: ``cuda``
    becomes ``cuda:LOCAL_RANK``."""
    if launched_world_size() <= 1:
        yield device
        return
    backend = "gloo"
    if torch.device(device).type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ValueError(
                f"--device: process {local} on this machine has no GPU of its own: "
                f"{torch.cuda.device_count()} CUDA device(s) for "
                f"{os.environ.get('LOCAL_WORLD_SIZE')} processes; start at most one process per GPU"
            )
        device, backend = f"cuda:{local}", "nccl"
        torch.cuda.set_device(local)
    dist.init_process_group(backend)
    try:
        yield device
    finally:
        # FSDP2 modules sit in reference cycles and would otherwise be collected at interpreter
        # exit, after the group is gone, where their pending gloo work can abort the process (seen
        # in spg-fast's own FSDP2 tests).
        gc.collect()
        dist.destroy_process_group()


class Ranks:
    """This process's place among the ranks of the default process group (rank 0 of 1 without one)
    and how it wraps models: ``ddp`` (the default) or ``fsdp``. ``device`` holds the tensors of
    the collectives."""

    def __init__(self, wrapper: str | None = None, device: torch.device | str = "cpu") -> None:
        if wrapper not in (None, *WRAPPERS):
            raise ValueError(f"wrapper must be None, {' or '.join(WRAPPERS)}, got {wrapper!r}")
        grouped = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if wrapper is not None and not grouped:
            raise ValueError(
                f"wrapper={wrapper!r} needs several processes: launch with torchrun (the default "
                "process group initialised, more than one rank)"
            )
        self.world = dist.get_world_size() if grouped else 1
        self.rank = dist.get_rank() if grouped else 0
        self.wrapper = (wrapper or "ddp") if grouped else None
        self.device = torch.device(device)

    @property
    def main(self) -> bool:
        """Whether this is rank 0, which prints progress and writes the files."""
        return self.rank == 0

    def share(self, indices: Tensor) -> Tensor:
        """This rank's contiguous share of a batch's ``indices`` (sizes differ by at most one; all
        of them for one process)."""
        return indices.tensor_split(self.world)[self.rank] if self.world > 1 else indices

    def seed_task(self, seed: int, task: int) -> None:
        """Give ranks other than 0 their own random stream for ``task`` (dropout draws on their
        share of each batch), derived from the seed, the rank and the task, so a resumed run draws
        what an uninterrupted one does. Rank 0 keeps the stream one process would have."""
        if self.rank > 0:
            torch.manual_seed(
                int(np.random.SeedSequence([seed, self.rank, task]).generate_state(1)[0])
            )

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` (already on its device) as trained here: itself for one process, in
        DistributedDataParallel, or sharded in place by FSDP2 (every trunk layer that has
        parameters, then the whole network), after taking rank 0's weights as DDP does."""
        if self.wrapper == "ddp":
            # Each task's step uses one head: the others' parameters get no gradient, which DDP must
            # be told.
            ids = [self.device.index] if self.device.type == "cuda" else None
            return nn.parallel.DistributedDataParallel(
                model, device_ids=ids, find_unused_parameters=True
            )
        if self.wrapper == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for t in [*model.parameters(), *model.buffers()]:
                dist.broadcast(t.detach(), 0)
            for layer in model.trunk:
                if next(layer.parameters(), None) is not None:
                    fully_shard(layer)
            fully_shard(model)
        return model

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks (float64, one all-reduce)."""
        if self.world == 1:
            return values
        total = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return total.tolist()

    def sync_buffers(self, model: nn.Module) -> None:
        """Every rank takes rank 0's buffers (BatchNorm running statistics, which each rank updates
        from its own share of the batches), as DDP does before each forward."""
        if self.world > 1:
            for buffer in model.buffers():
                dist.broadcast(buffer, 0)

    def full(self, state: Any) -> Any:
        """``state`` (nested dicts and lists) with every sharded tensor (DTensor) gathered whole, on
        every rank in the same order (a collective each); the rest as it is."""
        if self.wrapper != "fsdp":
            return state
        if isinstance(state, dict):
            return {k: self.full(v) for k, v in state.items()}
        if isinstance(state, list | tuple):
            return type(state)(self.full(v) for v in state)
        return (
            state.full_tensor()
            if isinstance(state, Tensor) and sharded.is_sharded(state)
            else state
        )

    def sharded_like(self, model: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
        """A whole-tensor state dict of ``model`` (from ``full``) distributed like ``model``'s own
        sharded tensors, so that ``model.load_state_dict`` takes it."""
        if self.wrapper != "fsdp":
            return state
        own = model.state_dict()
        return {
            k: sharded.distribute(v.to(own[k].device), own[k])
            if k in own and sharded.is_sharded(own[k])
            else v
            for k, v in state.items()
        }

    def from_main(self, work: Callable[[], T]) -> T:
        """``work()`` run on rank 0 only (the output folder's files), its result given to every
        rank; an exception there is raised on every rank."""
        if self.world == 1:
            return work()
        box: list[Any] = [None]
        if self.main:
            try:
                box = [(True, work())]
            except Exception as e:  # any failure: every rank must learn of it
                box = [(False, e)]
        dist.broadcast_object_list(
            box, src=0, device=self.device if self.device.type == "cuda" else None
        )
        ok, value = box[0]
        if not ok:
            raise value
        return value
