"""Shared test fixtures: a small multi-head network, synthetic tasks, and the spec written
out literally."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MultiHeadNet(nn.Module):
    """Two shared layers (a small trunk) and one linear head per task."""

    def __init__(
        self,
        n_in: int = 6,
        hidden: int = 12,
        n_tasks: int = 3,
        n_classes: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(n_in, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.Tanh(),
        )
        self.heads = nn.ModuleList(nn.Linear(hidden, n_classes) for _ in range(n_tasks))

    def forward(self, x: Tensor, task: int) -> Tensor:
        return self.heads[task](self.trunk(x))


def make_tasks(
    n_tasks: int = 3,
    n_batches: int = 3,
    batch: int = 8,
    n_in: int = 6,
    n_classes: int = 3,
    seed: int = 0,
) -> list[list[tuple[Tensor, Tensor]]]:
    """Per task, a list of (x, y) batches drawn from a task-specific linear rule."""
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(n_tasks):
        w = torch.randn(n_in, n_classes, generator=g)
        batches = []
        for _ in range(n_batches):
            x = torch.randn(batch, n_in, generator=g)
            batches.append((x, (x @ w).argmax(1)))
        tasks.append(batches)
    return tasks


def oracle_importance(h: Tensor) -> Tensor:
    """The spec's |tanh(standardize(h))| in float64, written independently of the library."""
    x = h.detach().to(torch.float64).reshape(-1)
    n = x.numel()
    if n < 2 or bool((x == x[0]).all()):
        return torch.zeros(h.shape, dtype=torch.float64)
    mean = x.sum() / n
    std = (((x - mean) ** 2).sum() / (n - 1)).sqrt()
    return ((x - mean) / std).tanh().abs().reshape(h.shape)


def literal_importance(
    model: MultiHeadNet, task: int, batches: list[tuple[Tensor, Tensor]]
) -> dict[str, Tensor]:
    """The spec's end-of-task importance of ``task`` for the trunk, computed the obvious way
    in float32."""
    shared = dict(model.trunk.named_parameters(prefix="trunk"))
    gamma = {n: torch.zeros_like(p) for n, p in shared.items()}
    for head in range(task + 1):
        model.zero_grad(set_to_none=True)
        for x, y in batches:
            logits = model(x, head)
            loss = F.cross_entropy(logits, y) if head == task else logits.sum()
            loss.backward()
        for n, p in shared.items():
            h = p.grad
            std = h.std()
            g = (
                torch.zeros_like(h)
                if std == 0 or not torch.isfinite(std)
                else ((h - h.mean()) / std).tanh().abs()
            )
            gamma[n] = torch.maximum(gamma[n], g)
    model.zero_grad(set_to_none=True)
    return gamma


def train_literal(
    model: MultiHeadNet, tasks: list, epochs: int, lr: float = 0.1
) -> dict[str, Tensor]:
    """Train on every task with plain SGD, masking gradients exactly as the spec writes it."""
    shared = dict(model.trunk.named_parameters(prefix="trunk"))
    acc: dict[str, Tensor] | None = None
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for task, batches in enumerate(tasks):
        for _ in range(epochs):
            for x, y in batches:
                opt.zero_grad()
                F.cross_entropy(model(x, task), y).backward()
                if acc is not None:
                    for n, p in shared.items():
                        p.grad.mul_(1 - acc[n])
                    head_scale = 1 - torch.cat([a.flatten() for a in acc.values()]).mean()
                    for p in model.heads.parameters():
                        if p.grad is not None:
                            p.grad.mul_(head_scale)
                opt.step()
        gamma = literal_importance(model, task, batches)
        acc = gamma if acc is None else {n: torch.maximum(acc[n], gamma[n]) for n in acc}
    return acc
