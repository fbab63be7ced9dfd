"""SPG in a Lightning training loop: three classification tasks learned one after another by one
network with a head per task, with and without SPG's callback. Runs on the CPU in a few seconds.

    pip install "spg-fast[lightning]"
    python examples/lightning_continual.py
"""

from __future__ import annotations

import logging

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from spg_fast import SPG
from spg_fast.integrations.lightning import SPGCallback

TASKS, FEATURES, HIDDEN, CLASSES, EPOCHS = 3, 32, 256, 4, 10


class MultiHeadNet(nn.Module):
    """A shared trunk and one linear head per task: ``net(x, task)`` gives that task's logits."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU()
        )
        self.heads = nn.ModuleList(nn.Linear(HIDDEN, CLASSES) for _ in range(TASKS))

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return self.heads[task](self.trunk(x))


class ContinualModule(L.LightningModule):
    """Trains ``net`` on the head of ``self.task`` (set before each ``fit``)."""

    def __init__(self, net: MultiHeadNet) -> None:
        super().__init__()
        self.net = net
        self.task = 0

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x, self.task), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.2)


def make_tasks(seed: int = 0) -> list[tuple[TensorDataset, TensorDataset]]:
    """Per task, train and test sets labelled by a task-specific random linear teacher."""
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(TASKS):
        teacher = torch.randn(FEATURES, CLASSES, generator=g)
        x = torch.randn(1024, FEATURES, generator=g)
        y = (x @ teacher).argmax(1)
        tasks.append((TensorDataset(x[:768], y[:768]), TensorDataset(x[768:], y[768:])))
    return tasks


@torch.no_grad()
def accuracy(net: MultiHeadNet, data: TensorDataset, task: int) -> float:
    x, y = data.tensors
    net.eval()
    acc = (net(x, task).argmax(1) == y).float().mean().item()
    net.train()
    return acc


def learn_sequence(
    tasks: list[tuple[TensorDataset, TensorDataset]], use_spg: bool
) -> list[list[float]]:
    """Fit the tasks in order; returns R[i][j], the test accuracy on task j after learning
    task i."""
    torch.manual_seed(0)
    module = ContinualModule(MultiHeadNet())
    spg = SPG(module.net, heads=module.net.heads)  # every parameter outside the heads is shared
    callbacks = (
        [SPGCallback(spg)] if use_spg else []
    )  # masks each step; ends the task when fit returns
    rows = []
    for task, (train, _) in enumerate(tasks):
        module.task = task
        trainer = L.Trainer(
            max_epochs=EPOCHS,
            accelerator="cpu",
            devices=1,
            callbacks=callbacks,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, DataLoader(train, batch_size=128, shuffle=True))
        rows.append([accuracy(module.net, tasks[j][1], j) for j in range(task + 1)])
    if use_spg:
        print(
            f"SPG finished {spg.tasks_finished} tasks; head gradients are now scaled by "
            f"{float(spg.head_scale):.3f}"
        )
    return rows


def main() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    tasks = make_tasks()
    for name, use_spg in (("fine-tuning", False), ("SPG", True)):
        rows = learn_sequence(tasks, use_spg)
        print(f"\n{name}: test accuracy on task j (columns) after learning task i (rows)")
        for i, row in enumerate(rows):
            print(f"  task {i}  " + "  ".join(f"{a:.3f}" for a in row))
        final = rows[-1]
        forgetting = sum(
            max(rows[i][j] for i in range(j, TASKS)) - final[j] for j in range(TASKS - 1)
        ) / (TASKS - 1)
        print(f"  average accuracy {sum(final) / TASKS:.3f}, forgetting {forgetting:.3f}")


if __name__ == "__main__":
    main()
