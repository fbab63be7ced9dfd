"""SPG in Lightning on several processes: three tasks learned one after another by a network with a
head per task, with AdamW, under DDP (``strategy="ddp"``, here with ``find_unused_parameters=True``
as a task trains one head) or, with ``--fsdp2``, under FSDP2 (``ModelParallelStrategy``, the
network sharded with ``fully_shard`` in ``configure_model`` and SPG built on the sharded network).
Lightning starts the other processes by running this script again. Each process trains and
measures its share of every task's data; the callback adds the importance pass's gradient sums over
the processes, so every process ends each task with the importance of all the data. Runs on the
CPU (gloo) in under a minute.

    pip install "spg-fast[lightning]"
    python examples/lightning_ddp.py                     # 2 processes, DDP
    python examples/lightning_ddp.py --fsdp2             # 2 processes, FSDP2
    python examples/lightning_ddp.py --processes 1 --batch-size 32   # the same run, one process

``--out DIR`` also writes, per process, what a test compares: SPG's state and the weights after
each task (``DIR/rank<r>.pt``) and the last checkpoint of each task (``DIR/task<k>/last.ckpt``).
"""

from __future__ import annotations

import argparse
import copy
import logging
import tempfile
from pathlib import Path

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset

from spg_fast import SPG
from spg_fast.integrations.lightning import SPGCallback

TASKS, FEATURES, HIDDEN, CLASSES, EXAMPLES, EPOCHS = 3, 16, 64, 4, 256, 3


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


class ContinualModule(L.LightningModule):
    """Trains ``net`` on the head of ``self.task`` (set before each ``fit``) with AdamW."""

    def __init__(self, net: MultiHeadNet) -> None:
        super().__init__()
        self.net = net
        self.task = 0

    def configure_model(self) -> None:
        """Under FSDP2 (``ModelParallelStrategy``): shard each linear layer of the trunk, then the
        whole network, over the data-parallel processes; once (every fit calls it)."""
        if self._device_mesh is None or isinstance(self.net.heads[0].weight, DTensor):
            return
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net.trunk:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _index: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x, self.task), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def task_data(task: int) -> TensorDataset:
    """Task ``task``'s training set, labelled by a task-specific random linear teacher."""
    g = torch.Generator().manual_seed(task)
    teacher = torch.randn(FEATURES, CLASSES, generator=g)
    x = torch.randn(EXAMPLES, FEATURES, generator=g)
    return TensorDataset(x, (x @ teacher).argmax(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument(
        "--batch-size", type=int, default=16, help="per process (a step sees all processes')"
    )
    parser.add_argument("--fsdp2", action="store_true", help="FSDP2 instead of DDP")
    parser.add_argument("--out", type=Path, help="where to write what a test compares")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    torch.set_num_threads(1)

    torch.manual_seed(0)
    module = ContinualModule(MultiHeadNet())
    if args.fsdp2:
        # SPG on the sharded network: built when the first fit starts, after configure_model.
        callback = SPGCallback(lambda module: SPG(module.net, heads=module.net.heads))

        def strategy() -> ModelParallelStrategy:  # one per trainer
            return ModelParallelStrategy(data_parallel_size=args.processes, tensor_parallel_size=1)

    else:
        # SPG on the plain network, as on one process: Lightning wraps the module in DDP itself.
        callback = SPGCallback(SPG(module.net, heads=module.net.heads))

        # A task trains one head: DDP must expect the other heads to get no gradient.
        def strategy() -> str:
            return "ddp_find_unused_parameters_true" if args.processes > 1 else "auto"

    # AdamW: masked on its update (mask="auto").
    root = args.out or Path(tempfile.mkdtemp())
    results = []
    for task in range(TASKS):
        module.task = task
        trainer = L.Trainer(
            strategy=strategy(),
            accelerator="cpu",
            devices=args.processes,
            max_epochs=EPOCHS,
            callbacks=[callback, ModelCheckpoint(dirpath=root / f"task{task}", save_last=True)],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        # The distributed sampler Lightning adds gives each process its share of the data.
        trainer.fit(module, DataLoader(task_data(task), batch_size=args.batch_size))
        spg = callback.spg
        results.append(
            {
                # Full tensors (gathered from the shards under FSDP2), copied.
                "spg": copy.deepcopy(spg.state_dict(full=True)),
                "params": {n: _full(p) for n, p in module.net.named_parameters()},
            }
        )
        usage = spg.usage()  # every process: under FSDP2 it adds up the shards
        if trainer.is_global_zero:
            print(
                f"task {task}: ended on {trainer.world_size} process(es); mean importance "
                f"{usage.mean:.3f}, {usage.above_0_9:.1%} of shared elements above 0.9"
            )
    if args.out:
        torch.save(results, args.out / f"rank{trainer.global_rank}.pt")


def _full(p: torch.Tensor) -> torch.Tensor:
    """A copy of ``p`` whole (gathered from the processes' shards under FSDP2)."""
    return (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()


if __name__ == "__main__":
    main()
