"""Backbones with one linear head per task: an MLP for vector data and the paper's AlexNet-like conv net."""

from __future__ import annotations

import math

from torch import Tensor, nn

BACKBONES = ("mlp", "alexnet")


class MultiHeadNet(nn.Module):
    """A shared ``trunk`` and one linear head per task; ``forward(x, task)`` returns that task's logits."""

    def __init__(self, trunk: nn.Module, features: int, head_sizes: list[int]) -> None:
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleList(nn.Linear(features, n) for n in head_sizes)

    def forward(self, x: Tensor, task: int) -> Tensor:
        return self.heads[task](self.trunk(x))


def mlp(input_shape: tuple[int, ...], head_sizes: list[int], hidden: int = 256, dropout: float = 0.0) -> MultiHeadNet:
    """Two fully connected ReLU layers of ``hidden`` units over the flattened input."""
    trunk = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), hidden), nn.ReLU(), nn.Dropout(dropout),
                          nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout))
    return MultiHeadNet(trunk, hidden, head_sizes)


def alexnet(input_shape: tuple[int, ...], head_sizes: list[int], hidden: int = 2048,
            dropout: float = 0.2, fc_dropout: float = 0.5) -> MultiHeadNet:
    """The paper's backbone: 3 conv layers (64, 128, 256 channels; kernel sizes size/8, size/10 and 2, at least 1),
    each followed by ReLU, dropout and 2x2 max-pool, then 2 fully connected layers of ``hidden`` units with ReLU and
    dropout. Pooling rounds up, so small inputs keep at least one pixel."""
    if len(input_shape) != 3:
        raise ValueError(f"alexnet needs (channels, height, width) inputs, got shape {input_shape}")
    channels, size = input_shape[0], input_shape[1]
    layers: list[nn.Module] = []
    for out, kernel in ((64, max(1, size // 8)), (128, max(1, size // 10)), (256, 2)):
        kernel = min(kernel, size)
        layers += [nn.Conv2d(channels, out, kernel), nn.ReLU(), nn.Dropout(dropout), nn.MaxPool2d(2, ceil_mode=True)]
        size = math.ceil((size - kernel + 1) / 2)
        channels = out
    trunk = nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * size * size, hidden), nn.ReLU(),
                          nn.Dropout(fc_dropout), nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(fc_dropout))
    return MultiHeadNet(trunk, hidden, head_sizes)


def build_model(backbone: str, input_shape: tuple[int, ...], head_sizes: list[int], dropout: float) -> MultiHeadNet:
    if backbone == "mlp":
        return mlp(input_shape, head_sizes, dropout=dropout)
    if backbone == "alexnet":
        return alexnet(input_shape, head_sizes, dropout=dropout, fc_dropout=min(1.0, 2.5 * dropout))
    raise ValueError(f"unknown backbone {backbone!r}; valid: {', '.join(BACKBONES)}")
