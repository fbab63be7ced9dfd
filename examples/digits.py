"""Train one small network with SPG on 5 two-class tasks of scikit-learn's digits; print the accuracy matrix."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from spg_fast import SPG


class Net(nn.Module):
    def __init__(self, n_tasks: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(256, 2) for _ in range(n_tasks))

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return self.heads[task](self.trunk(x))


def split_tasks(n_tasks: int = 5, seed: int = 0):
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(10, generator=g)
    tasks = []
    for t in range(n_tasks):
        classes = order[2 * t: 2 * t + 2]
        idx = torch.nonzero(torch.isin(y, classes)).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        labels = (y[idx] == classes[1]).long()
        cut = len(idx) * 3 // 4
        train = list(zip(x[idx[:cut]].split(32), labels[:cut].split(32), strict=True))
        tasks.append((train, (x[idx[cut:]], labels[cut:])))
    return tasks


def main(method: str = "spg", epochs: int = 20) -> None:
    torch.manual_seed(0)
    tasks = split_tasks()
    model = Net(len(tasks))
    spg = SPG(model, heads=model.heads)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    if method == "spg":
        optimizer = spg.wrap(optimizer)
    acc = []
    for t, (train, _) in enumerate(tasks):
        for _ in range(epochs):
            for x, y in train:
                optimizer.zero_grad()
                F.cross_entropy(model(x, t), y).backward()
                optimizer.step()
        spg.end_task(t, train)
        with torch.no_grad():
            acc.append([(model(xt, j).argmax(1) == yt).float().mean().item() for j, (_, (xt, yt))
                        in enumerate(tasks[: t + 1])])
    print(f"accuracy matrix R[i][j] ({method}): test accuracy on task j after learning task i")
    for i, row in enumerate(acc):
        print(f"after task {i}: " + " ".join(f"{a:6.3f}" for a in row))
    last = acc[-1]
    forgetting = sum(max(acc[i][j] for i in range(j, len(acc) - 1)) - last[j] for j in range(len(acc) - 1))
    print(f"ACC {sum(last) / len(last):.3f}   forgetting {forgetting / (len(acc) - 1):.3f}")


if __name__ == "__main__":
    main("spg")
    main("finetune")
