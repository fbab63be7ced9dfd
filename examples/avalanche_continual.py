"""SPG in Avalanche: three task-incremental experiences (a benchmark built from tensors, one task
label each) learned by a network whose classifier is a ``MultiHeadClassifier``, with Avalanche's
``Naive`` strategy and AdamW, with and without SPG's plugin. Runs on the CPU in under a minute.

    pip install "spg-fast[avalanche]"   # with a torchvision matching torch: make test-avalanche
    python examples/avalanche_continual.py
"""

from __future__ import annotations

import torch
from avalanche.benchmarks import tensors_benchmark
from avalanche.models import MultiHeadClassifier, MultiTaskModule
from avalanche.training.plugins import EvaluationPlugin
from avalanche.training.supervised import Naive
from torch import nn

from spg_fast import SPG
from spg_fast.integrations.avalanche import SPGPlugin

TASKS, FEATURES, HIDDEN, CLASSES, EXAMPLES, EPOCHS = 3, 32, 256, 4, 1024, 10


class Net(MultiTaskModule):
    """A shared trunk and a head per task label: ``net(x, task_label)``."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU()
        )
        self.classifier = MultiHeadClassifier(HIDDEN, CLASSES)

    def forward_single_task(self, x: torch.Tensor, task_label: int) -> torch.Tensor:
        return self.classifier(self.trunk(x), task_label)


def benchmark() -> tuple[object, list[list[torch.Tensor]]]:
    """Per task, train and test tensors labelled by a task-specific random linear teacher."""
    g = torch.Generator().manual_seed(0)
    train, test = [], []
    for _ in range(TASKS):
        teacher = torch.randn(FEATURES, CLASSES, generator=g)
        x = torch.randn(EXAMPLES, FEATURES, generator=g)
        y = (x @ teacher).argmax(1)
        train.append([x[:768], y[:768]])
        test.append([x[768:], y[768:]])
    return tensors_benchmark(
        train_tensors=train, test_tensors=test, task_labels=list(range(TASKS))
    ), test


@torch.no_grad()
def accuracy(net: Net, data: list[torch.Tensor], task: int) -> float:
    net.eval()
    x, y = data
    acc = (net(x, task).argmax(1) == y).float().mean().item()
    net.train()
    return acc


def learn_sequence(use_spg: bool) -> list[list[float]]:
    """Train the experiences in order; R[i][j], the test accuracy on task j after task i."""
    scenario, test = benchmark()
    torch.manual_seed(0)
    net = Net()
    # The classifier's heads (one per task label, added by Avalanche) are SPG's heads.
    plugins = [SPGPlugin(SPG(net, heads="classifier"))] if use_spg else []
    strategy = Naive(
        model=net,
        optimizer=torch.optim.AdamW(net.parameters(), lr=1e-3),  # masked on its update
        train_mb_size=128,
        train_epochs=EPOCHS,
        plugins=plugins,
        evaluator=EvaluationPlugin(loggers=[]),
    )
    rows = []
    for task, experience in enumerate(scenario.train_stream):
        strategy.train(experience)  # trains, then SPG ends the task on the experience's data
        rows.append([accuracy(net, test[j], j) for j in range(task + 1)])
    return rows


def main() -> None:
    for name, use_spg in (("fine-tuning", False), ("SPG", True)):
        rows = learn_sequence(use_spg)
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
