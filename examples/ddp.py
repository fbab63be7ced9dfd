"""SPG in a hand-written DistributedDataParallel loop: three tasks learned one after another by a
network with a head per task, each process training on its share of every task's data. Runs on the
CPU with gloo (on GPUs with nccl, one per process).

    torchrun --standalone --nproc-per-node 2 examples/ddp.py [--out runs/ddp-example]

Rank 0 writes SPG's checkpoint after each task (``spg-task<k>.pt``, which loads into a
single-process SPG too); every rank writes what a test compares (``rank<r>.pt``: SPG's state and the
weights after each task).
"""

from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from spg_fast import SPG

TASKS, FEATURES, HIDDEN, CLASSES, EXAMPLES, EPOCHS, BATCH = 3, 16, 64, 4, 256, 3, 16


class MultiHeadNet(nn.Module):
    """A shared trunk and one linear head per task: ``net(x, task)`` gives that task's logits."""

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
    parser.add_argument("--out", type=Path, default=Path("runs/ddp-example"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)
    # A task trains one head, so the other heads get no gradient: DDP must be told to expect that.
    model = DistributedDataParallel(MultiHeadNet().to(device), find_unused_parameters=True)
    spg = SPG(model, heads="heads")  # names as in the plain model: "trunk.0.weight", ...
    opt = spg.wrap(torch.optim.SGD(model.parameters(), lr=0.1))  # SGD: the paper's gradient mask
    results = []
    for task in range(TASKS):
        data = task_data(task)
        sampler = DistributedSampler(data, shuffle=True, seed=task)  # this process's share
        loader = DataLoader(data, batch_size=BATCH, sampler=sampler)
        for epoch in range(EPOCHS):
            sampler.set_epoch(epoch)
            for x, y in loader:
                opt.zero_grad()
                F.cross_entropy(model(x.to(device), task), y.to(device)).backward()
                opt.step()  # DDP averaged the gradients; SPG masks them the same on every process
        # Every process: the importance of all processes' data, identical everywhere.
        spg.end_task(task, loader)
        if rank == 0:
            state = spg.state_dict()  # loads into a single-process SPG too
            torch.save(state, args.out / f"spg-task{task}.pt")
            usage = spg.usage()
            print(
                f"task {task}: ended on {dist.get_world_size()} processes; mean importance "
                f"{usage.mean:.3f}, head scale {usage.head_scale:.3f}"
            )
        results.append(
            {
                "spg": copy.deepcopy(spg.state_dict()),  # SPG's own tensors: copied
                "params": {n: p.detach().cpu().clone() for n, p in model.module.named_parameters()},
            }
        )
    torch.save(results, args.out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
