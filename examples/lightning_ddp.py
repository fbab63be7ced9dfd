"""SPG in Lightning under DDP: three tasks learned one after another by a network with a head per
task, with AdamW, on several processes (``strategy="ddp"``, here with
``find_unused_parameters=True`` as a task trains one head: Lightning starts the other processes by
running this script again). Each process trains and measures its share of every task's data; the
callback adds the importance pass's gradient sums over the processes, so every process ends each
task with the importance of all the data. Runs on the CPU (gloo) in under a minute.

    pip install "spg-fast[lightning]"
    python examples/lightning_ddp.py                     # 2 processes
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
from torch import nn
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
    parser.add_argument("--out", type=Path, help="where to write what a test compares")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    torch.set_num_threads(1)

    torch.manual_seed(0)
    module = ContinualModule(MultiHeadNet())
    # SPG on the plain network, as on one process: Lightning wraps the module in DDP itself.
    spg = SPG(module.net, heads=module.net.heads)
    callback = SPGCallback(spg)  # AdamW: masked on its update (mask="auto")
    root = args.out or Path(tempfile.mkdtemp())
    results = []
    for task in range(TASKS):
        module.task = task
        trainer = L.Trainer(
            # A task trains one head: DDP must expect the other heads to get no gradient.
            strategy="ddp_find_unused_parameters_true" if args.processes > 1 else "auto",
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
        results.append(
            {
                "spg": copy.deepcopy(spg.state_dict()),  # SPG's own tensors: copied
                "params": {n: p.detach().clone() for n, p in module.net.named_parameters()},
            }
        )
        if trainer.is_global_zero:
            usage = spg.usage()
            print(
                f"task {task}: ended on {trainer.world_size} process(es); mean importance "
                f"{usage.mean:.3f}, {usage.above_0_9:.1%} of shared elements above 0.9"
            )
    if args.out:
        torch.save(results, args.out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
