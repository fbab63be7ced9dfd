"""Backbones: the authors' AlexNet layer by layer for every paper sequence's input (expected shapes
and parameter counts worked out by hand below from the authors' formula, kernel size//8, size//10,
2 and floor pooling), the smallest change for 8x8 digits, and the reduced ResNet-18."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spg_fast.harness import ConfigError
from spg_fast.harness.models import build_model, parameter_count


def _layer_shapes(model, input_shape):
    """(layer type, output shape without the batch) for each conv, pool and linear layer of
    the trunk."""
    shapes = []
    hooks = [
        m.register_forward_hook(
            lambda m, i, o: shapes.append((type(m).__name__, tuple(o.shape[1:])))
        )
        for m in model.trunk
        if isinstance(m, nn.Conv2d | nn.MaxPool2d | nn.Linear)
    ]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(2, *input_shape), 0)
    for h in hooks:
        h.remove()
    return shapes


# 32x32 (CIFAR-100; TinyImageNet as the authors resize it): conv1 k=32//8=4: 32-4+1=29, pool 14;
# conv2 k=32//10=3: 14-3+1=12, pool 6; conv3 k=2: 6-2+1=5, pool 2 (floor); fc1 takes 256*2*2=1024.
S32 = [
    ("Conv2d", (64, 29, 29)),
    ("MaxPool2d", (64, 14, 14)),
    ("Conv2d", (128, 12, 12)),
    ("MaxPool2d", (128, 6, 6)),
    ("Conv2d", (256, 5, 5)),
    ("MaxPool2d", (256, 2, 2)),
    ("Linear", (2048,)),
    ("Linear", (2048,)),
]
# 28x28 (FEMNIST): k=3: 26, pool 13; k=2: 12, pool 6; k=2: 5, pool 2; fc1 takes 1024.
S28 = [
    ("Conv2d", (64, 26, 26)),
    ("MaxPool2d", (64, 13, 13)),
    ("Conv2d", (128, 12, 12)),
    ("MaxPool2d", (128, 6, 6)),
    ("Conv2d", (256, 5, 5)),
    ("MaxPool2d", (256, 2, 2)),
    ("Linear", (2048,)),
    ("Linear", (2048,)),
]
# 64x64 (TinyImageNet's own size): k=8: 57, pool 28; k=6: 23, pool 11; k=2: 10, pool 5; fc1
# takes 256*5*5=6400.
S64 = [
    ("Conv2d", (64, 57, 57)),
    ("MaxPool2d", (64, 28, 28)),
    ("Conv2d", (128, 23, 23)),
    ("MaxPool2d", (128, 11, 11)),
    ("Conv2d", (256, 10, 10)),
    ("MaxPool2d", (256, 5, 5)),
    ("Linear", (2048,)),
    ("Linear", (2048,)),
]
# Parameters: conv1 c*64*k1*k1+64, conv2 64*128*k2*k2+128, conv3 128*256*4+256 = 131,328,
# fc1 fc_in*2048+2048, fc2 2048*2048+2048 = 4,196,352, heads T*(2048*n+n).
# 32x32x3: 3,136 + 73,856 + 131,328 + 2,099,200 + 4,196,352 = 6,503,872 (+ heads)
# 28x28x1: 640 + 32,896 + 131,328 + 2,099,200 + 4,196,352 = 6,460,416 (+ heads)
# 64x64x3: 12,352 + 295,040 + 131,328 + 13,109,248 + 4,196,352 = 17,744,320 (+ heads)
PAPER = [
    # sequence, input, tasks x classes, shapes, parameters
    (
        "cifar100-10",
        (3, 32, 32),
        10,
        10,
        S32,
        6_503_872 + 10 * (2048 * 10 + 10),
    ),  # = 6,708,772, the issue's
    ("cifar100-20", (3, 32, 32), 20, 5, S32, 6_503_872 + 20 * (2048 * 5 + 5)),
    ("tinyimagenet-10", (3, 32, 32), 10, 20, S32, 6_503_872 + 10 * (2048 * 20 + 20)),
    ("tinyimagenet-20", (3, 32, 32), 20, 10, S32, 6_503_872 + 20 * (2048 * 10 + 10)),
    ("tinyimagenet-10 at 64x64", (3, 64, 64), 10, 20, S64, 17_744_320 + 10 * (2048 * 20 + 20)),
    ("femnist-10", (1, 28, 28), 10, 62, S28, 6_460_416 + 10 * (2048 * 62 + 62)),
    ("femnist-20", (1, 28, 28), 20, 62, S28, 6_460_416 + 20 * (2048 * 62 + 62)),
]


@pytest.mark.parametrize(
    "name, shape, tasks, classes, layers, parameters", PAPER, ids=[p[0] for p in PAPER]
)
def test_alexnet_is_the_authors_network(name, shape, tasks, classes, layers, parameters):
    model = build_model("alexnet", shape, [classes] * tasks, dropout_conv=0.3, dropout_fc=0.4)
    assert _layer_shapes(model, shape) == layers
    assert parameter_count(model) == parameters
    assert model.notes == []
    rates = [m.p for m in model.trunk if isinstance(m, nn.Dropout)]
    assert rates == [
        0.3,
        0.3,
        0.4,
        0.4,
        0.4,
    ]  # conv1, conv2 | conv3, fc1, fc2 (as in the authors' network)
    assert parameter_count(build_model("alexnet", (3, 32, 32), [10] * 10)) == 6_708_772


def test_alexnet_on_8x8_digits_changes_the_least_and_says_so():
    model = build_model("alexnet", (64,), [2] * 5, image_shape=(1, 8, 8))
    # conv1 k=8//8=1: 8, pool 4; conv2 k=8//10=0 -> 1: 4, pool 2; conv3 k=2: 1, pool would
    # give 0 -> rounds up to 1
    assert _layer_shapes(model, (64,)) == [
        ("Conv2d", (64, 8, 8)),
        ("MaxPool2d", (64, 4, 4)),
        ("Conv2d", (128, 4, 4)),
        ("MaxPool2d", (128, 2, 2)),
        ("Conv2d", (256, 1, 1)),
        ("MaxPool2d", (256, 1, 1)),
        ("Linear", (2048,)),
        ("Linear", (2048,)),
    ]
    assert model.notes == [
        "alexnet: conv2 kernel 0 (for a 8-pixel input) raised to 1",
        "alexnet: pool3 of a 1x1 map rounds up to keep one pixel",
    ]


def test_reduced_resnet18():
    model = build_model("resnet18", (3, 32, 32), [10] * 10)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 20
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 20  # 1 + 16 + 3 shortcuts
    assert model.heads[0].in_features == 160
    # stem 3*20*9 + BN 2*20 = 580; a block cin->cout: 9*cin*cout + 9*cout*cout + 4*cout (two BN),
    # plus a shortcut cin*cout + 2*cout where the shape changes. Stage 1 (20->20, 20->20):
    # 2 * 7,280 = 14,560; stage 2: 22,640 + 28,960 = 51,600; stage 3: 90,080 + 115,520 = 205,600;
    # stage 4: 359,360 + 461,440 = 820,800.
    assert parameter_count(model) == 580 + 14_560 + 51_600 + 205_600 + 820_800 + 10 * (
        160 * 10 + 10
    )
    x = build_model("resnet18", (64,), [2], image_shape=(1, 8, 8))(torch.randn(4, 64), 0)
    assert x.shape == (4, 2)


@pytest.mark.parametrize(
    "backbone, kwargs, message",
    [
        ("mlp", {"dropout_conv": 0.1}, "dropout_conv: the mlp backbone has no conv layers"),
        (
            "resnet18",
            {"dropout_fc": 0.1},
            "dropout_fc: the resnet18 backbone has no dropout layers",
        ),
        ("alexnet", {}, "backbone: alexnet needs images; this sequence holds vectors of 64 values"),
    ],
)
def test_settings_a_backbone_cannot_honour_are_errors(backbone, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        build_model(backbone, (64,), [2], image_shape=(1, 8, 8) if kwargs else None, **kwargs)
