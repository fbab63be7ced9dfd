"""SPG on an FSDP2 model (``fully_shard``): three tasks learned one after another by a network with
a head per task, its parameters, SPG's importance and the optimizer's state sharded over the
processes, a ``torch.distributed.checkpoint`` (DCP) checkpoint after each task, and a run that
resumes from one. Runs on the CPU with gloo (on GPUs with nccl, one per process).

    torchrun --standalone --nproc-per-node 2 examples/fsdp2.py [--out runs/fsdp2-example]
    # stopped after task 0, then resumed from its checkpoint: the same result
    torchrun --standalone --nproc-per-node 2 examples/fsdp2.py --stop-after 0
    torchrun --standalone --nproc-per-node 2 examples/fsdp2.py --resume runs/fsdp2-example/task0

Every rank writes what a test compares (``rank<r>.pt``: SPG's full state after the last task).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import spg_fast.optim
from spg_fast import SPG
from spg_fast.checkpoint import SPGState

TASKS, FEATURES, HIDDEN, CLASSES, EXAMPLES, EPOCHS, BATCH = 3, 16, 64, 4, 256, 3, 16


class MultiHeadNet(nn.Module):
    """A shared trunk (``nn.Sequential``) and one linear head per task (``nn.ModuleList``)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN)
        )
        self.heads = nn.ModuleList(nn.Linear(HIDDEN, CLASSES) for _ in range(TASKS))

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return self.heads[task](torch.tanh(self.trunk(x)))


def task_data(task: int) -> TensorDataset:
    """Task ``task``'s training set, labelled by a task-specific random linear teacher."""
    g = torch.Generator().manual_seed(task)
    teacher = torch.randn(FEATURES, CLASSES, generator=g)
    x = torch.randn(EXAMPLES, FEATURES, generator=g)
    return TensorDataset(x, (x @ teacher).argmax(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/fsdp2-example"))
    parser.add_argument("--stop-after", type=int, default=TASKS - 1, help="the last task to learn")
    parser.add_argument("--resume", type=Path, help="a task's checkpoint folder to continue from")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)
    model = MultiHeadNet().to(device)
    for layer in model.trunk:
        if any(p.requires_grad for p in layer.parameters()):
            fully_shard(layer)
    fully_shard(model)
    spg = SPG(model, heads="heads")  # built on the sharded model: its importance is sharded too
    opt = spg_fast.optim.AdamW(model.parameters(), lr=3e-3, spg=spg)  # or spg.wrap(AdamW(...))

    first = 0
    if args.resume:
        model_state, optim_state = get_state_dict(model, opt)
        state = {"model": model_state, "optim": optim_state, "spg": SPGState(spg)}
        # Heads of tasks not yet learned have no optimizer state in the checkpoint, while the fresh
        # optimizer asks for theirs (get_state_dict gave every parameter a state, as after one
        # step with a zero gradient): a partial load leaves those as they are ...
        dcp.load(
            state,
            checkpoint_id=str(args.resume),
            planner=DefaultLoadPlanner(allow_partial_load=True),
        )
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        # ... and dropping them lets those heads start as in a run never interrupted (AdamW's
        # first step of a parameter differs from its second).
        saved = dcp.FileSystemReader(str(args.resume)).read_metadata().state_dict_metadata
        for name, p in model.named_parameters():
            if f"optim.state.{name}.step" not in saved:
                opt.state.pop(p, None)
        first = spg.tasks_finished  # SPGState installed SPG's part (checked on every rank)

    for task in range(first, args.stop_after + 1):
        data = task_data(task)
        sampler = DistributedSampler(data, shuffle=True, seed=task)  # this process's share
        loader = DataLoader(data, batch_size=BATCH, sampler=sampler)
        for epoch in range(EPOCHS):
            sampler.set_epoch(epoch)
            for x, y in loader:
                opt.zero_grad()
                F.cross_entropy(model(x.to(device), task), y.to(device)).backward()
                opt.step()
        spg.end_task(task, loader)  # every rank: the importance of all ranks' data
        model_state, optim_state = get_state_dict(model, opt)
        dcp.save(
            {"model": model_state, "optim": optim_state, "spg": SPGState(spg)},
            checkpoint_id=str(args.out / f"task{task}"),
        )
        usage = spg.usage()  # a collective: every rank calls it
        if rank == 0:
            print(
                f"task {task}: ended on {dist.get_world_size()} processes; mean importance "
                f"{usage.mean:.3f}, head scale {usage.head_scale:.3f}"
            )
    full = spg.state_dict(full=True)  # a collective: the full tensors on every rank
    torch.save(full, args.out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
