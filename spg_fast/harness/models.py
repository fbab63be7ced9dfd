"""Backbones with one linear head per task: an MLP for vector data, the authors' AlexNet and a
reduced ResNet-18 (BatchNorm) for images."""

from __future__ import annotations

import math

from torch import Tensor, nn

from spg_fast.harness.config import ConfigError

BACKBONES = ("mlp", "alexnet", "resnet18")


class MultiHeadNet(nn.Module):
    """A shared ``trunk`` and one linear head per task; ``forward(x, task)`` returns that
    task's logits."""

    def __init__(
        self, trunk: nn.Module, features: int, head_sizes: list[int], notes: list[str] | None = None
    ) -> None:
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleList(nn.Linear(features, n) for n in head_sizes)
        self.notes = (
            notes or []
        )  # how the network departs from its definition for this input (shown in the log)

    def forward(self, x: Tensor, task: int) -> Tensor:
        return self.heads[task](self.trunk(x))


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def mlp(
    input_shape: tuple[int, ...], head_sizes: list[int], hidden: int = 256, dropout: float = 0.0
) -> MultiHeadNet:
    """Two fully connected ReLU layers of ``hidden`` units over the flattened input, each followed
    by dropout."""
    trunk = nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), hidden),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Dropout(dropout),
    )
    return MultiHeadNet(trunk, hidden, head_sizes)


def alexnet(
    input_shape: tuple[int, ...],
    head_sizes: list[int],
    hidden: int = 2048,
    dropout_conv: float = 0.0,
    dropout_fc: float = 0.0,
) -> MultiHeadNet:
    """The authors' AlexNet: conv layers of 64, 128 and 256 channels with kernel sizes size//8,
    size//10 and 2 (size = the input's height), each followed by ReLU, dropout and a 2x2 max-pool
    that rounds down, then two fully connected layers of ``hidden`` units with ReLU and dropout.
    ``dropout_conv`` follows the first two conv layers, ``dropout_fc`` the third conv layer and both
    fully connected layers, as in the authors' network.

    Inputs smaller than 10 pixels (the digits' 8x8) would give a kernel of size 0 or a map pooled to
    nothing; there a kernel size is raised to 1 and a pooling that would leave no pixel rounds up,
    and ``notes`` says so."""
    if len(input_shape) != 3 or input_shape[1] != input_shape[2]:
        raise ConfigError(
            "backbone",
            f"alexnet needs square (channels, height, width) inputs, got shape {input_shape}",
        )
    channels, size = input_shape[0], input_shape[1]
    layers: list[nn.Module] = []
    notes = []
    for i, (out, kernel, rate) in enumerate(
        ((64, size // 8, dropout_conv), (128, size // 10, dropout_conv), (256, 2, dropout_fc)), 1
    ):
        if kernel < 1:
            notes.append(
                f"alexnet: conv{i} kernel {kernel} (for a {input_shape[1]}-pixel input) raised to 1"
            )
            kernel = 1
        conv_out = size - kernel + 1
        if conv_out < 1:
            raise ConfigError(
                "backbone",
                f"alexnet: an input of {input_shape[1]} pixels is too small (conv{i} sees {size})",
            )
        ceil = conv_out // 2 == 0
        if ceil:
            notes.append(
                f"alexnet: pool{i} of a {conv_out}x{conv_out} map rounds up to keep one pixel"
            )
        layers += [
            nn.Conv2d(channels, out, kernel),
            nn.ReLU(),
            nn.Dropout(rate),
            nn.MaxPool2d(2, ceil_mode=ceil),
        ]
        size = math.ceil(conv_out / 2) if ceil else conv_out // 2
        channels = out
    trunk = nn.Sequential(
        *layers,
        nn.Flatten(),
        nn.Linear(channels * size * size, hidden),
        nn.ReLU(),
        nn.Dropout(dropout_fc),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Dropout(dropout_fc),
    )
    return MultiHeadNet(trunk, hidden, head_sizes, notes)


class BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm layers with a residual connection (1x1 conv + BatchNorm when the
    shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.conv1(x)).relu()
        return (self.bn2(self.conv2(out)) + self.shortcut(x)).relu()


def resnet18(input_shape: tuple[int, ...], head_sizes: list[int], width: int = 20) -> MultiHeadNet:
    """The reduced ResNet-18 of continual-learning benchmarks (GEM, A-GEM, ...): a 3x3 stem of
    ``width`` channels, four stages of two basic blocks (``width`` x 1, 2, 4, 8 channels; strides 1,
    2, 2, 2), BatchNorm after every conv, global average pooling. About 1.1M parameters for
    3-channel inputs with ``width`` 20."""
    if len(input_shape) != 3:
        raise ConfigError(
            "backbone", f"resnet18 needs (channels, height, width) inputs, got shape {input_shape}"
        )
    layers: list[nn.Module] = [
        nn.Conv2d(input_shape[0], width, 3, 1, 1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
    ]
    cin = width
    for k, stride in enumerate((1, 2, 2, 2)):
        cout = width * 2**k
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    trunk = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return MultiHeadNet(trunk, cin, head_sizes)


def build_model(
    backbone: str,
    input_shape: tuple[int, ...],
    head_sizes: list[int],
    dropout_conv: float = 0.0,
    dropout_fc: float = 0.0,
    image_shape: tuple[int, ...] | None = None,
) -> MultiHeadNet:
    """``backbone`` for inputs of ``input_shape``; conv backbones read vector inputs as
    ``image_shape`` images. A dropout rate the backbone has no layer for is an error,
    not ignored."""
    if backbone == "mlp":
        if dropout_conv:
            raise ConfigError(
                "dropout_conv", "the mlp backbone has no conv layers (use --dropout-fc)"
            )
        return mlp(input_shape, head_sizes, dropout=dropout_fc)
    if backbone not in ("alexnet", "resnet18"):
        raise ValueError(f"unknown backbone {backbone!r}; valid: {', '.join(BACKBONES)}")
    shape = input_shape
    if len(input_shape) == 1:
        if image_shape is None:
            raise ConfigError(
                "backbone",
                f"{backbone} needs images; this sequence holds vectors of {input_shape[0]} values",
            )
        shape = image_shape
    if backbone == "alexnet":
        net = alexnet(shape, head_sizes, dropout_conv=dropout_conv, dropout_fc=dropout_fc)
    else:
        if dropout_conv or dropout_fc:
            raise ConfigError(
                "dropout_conv" if dropout_conv else "dropout_fc",
                "the resnet18 backbone has no dropout layers",
            )
        net = resnet18(shape, head_sizes)
    if shape != input_shape:
        net.trunk.insert(0, nn.Unflatten(1, shape))
    return net
