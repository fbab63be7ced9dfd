"""The training protocol's settings (``TrainConfig``): every value with its help text and its check,
shared by the Python API and the command line, which builds one option per field."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

OPTIMIZERS = ("sgd", "sgd-momentum", "adamw")
SCHEDULES = ("divide-stop", "plateau")
SHUFFLES = ("epoch", "once")
BN_STATS = ("shared", "per-task")


KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "True or False"}


class ConfigError(ValueError):
    """A setting out of range; ``name`` is the setting (the CLI option without its dashes, ``_``
    for ``-``).

    Args:
        name: the setting.
        why: what is wrong with its value.
    """

    def __init__(self, name: str, why: str) -> None:
        super().__init__(f"{name}: {why}")
        self.name = name
        self.why = why


def setting(
    default: Any,
    help: str,
    check: Any = None,
    choices: tuple[str, ...] | None = None,
    method: str | None = None,
) -> Any:
    """A dataclass field with its help text, its check (value -> why it is bad, or None), its
    choices and (method options) the method it applies to."""
    return field(
        default=default,
        metadata={"help": help, "check": check, "choices": choices, "method": method},
    )


def check_fields(settings: Any) -> None:
    """Check every field of the frozen dataclass ``settings`` against its kind, choices and check
    (an int given for a float is converted); a bad one is a ``ConfigError`` naming it."""
    for f in fields(settings):
        value = getattr(settings, f.name)
        kind = type(f.default)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            object.__setattr__(settings, f.name, float(value))
            value = float(value)
        if type(value) is not kind:
            raise ConfigError(f.name, f"must be {KIND_NAMES[kind]}, got {value!r}")
        choices, check = f.metadata["choices"], f.metadata["check"]
        if choices and value not in choices:
            raise ConfigError(f.name, f"must be one of {', '.join(choices)}, got {value!r}")
        why = check(value) if check else None
        if why:
            raise ConfigError(f.name, f"{why}, got {value!r}")


def positive(v: float) -> str | None:
    return None if math.isfinite(v) and v > 0 else "must be a finite number > 0"


def _at_least_one(v: int) -> str | None:
    return None if v >= 1 else "must be an integer >= 1"


def _rate(v: float) -> str | None:
    return None if 0 <= v < 1 else "must be a dropout rate in [0, 1)"


@dataclass(frozen=True)
class TrainConfig:
    """How each task is learnt. The defaults are the quick protocol with SGD (the embedded digits in
    seconds on 2 CPU cores); ``spg_fast.harness.protocol.resolve`` gives the presets (``quick``,
    ``paper``) per sequence and optimizer.

    Attributes:
        optimizer: ``sgd``, ``sgd-momentum`` or ``adamw``; a fresh one for every task.
        lr: the learning rate at the start of every task.
        lr_factor: the learning rate is divided by this on a validation-loss plateau.
        lr_min: the lowest learning rate (see ``schedule``).
        lr_patience: the epochs without a lower validation loss that make a plateau.
        max_epochs: the most epochs per task.
        batch_size: the training mini-batch size.
        schedule: ``divide-stop`` or ``plateau`` (the authors' code), how plateaus are handled.
        shuffle: ``epoch`` (a new order every epoch) or ``once`` (one seeded order per task).
        dropout_conv: dropout after alexnet's first two conv layers.
        dropout_fc: dropout after alexnet's third conv and fully connected layers and the mlp's.
        clip_heads: the heads' joint gradient norm is clipped at this value (0: no clipping).
        normalize: standardise image inputs per channel.
        bn_stats: ``shared`` or ``per-task`` BatchNorm statistics (resnet18).

    Raises:
        ConfigError: a value of the wrong kind or out of range, or ``lr_min`` above ``lr``.
    """

    optimizer: str = setting(
        "sgd",
        "sgd (plain, as in the paper), sgd-momentum (momentum 0.9) or adamw (torch's "
        "defaults: betas 0.9/0.999, weight decay 0.01); a fresh optimizer for every task",
        choices=OPTIMIZERS,
    )
    lr: float = setting(0.1, "learning rate at the start of every task", positive)
    lr_factor: float = setting(
        3.0,
        "divide the learning rate by this on a validation-loss plateau",
        lambda v: None if math.isfinite(v) and v > 1 else "must be a finite number > 1",
    )
    lr_min: float = setting(1e-3, "lowest learning rate (see --schedule)", positive)
    lr_patience: int = setting(
        3, "epochs without a lower validation loss that make a plateau", _at_least_one
    )
    max_epochs: int = setting(60, "most epochs per task", _at_least_one)
    batch_size: int = setting(64, "training mini-batch size", _at_least_one)
    schedule: str = setting(
        "divide-stop",
        "divide-stop: on a plateau divide the learning rate, stop the task "
        "when it would fall below --lr-min; plateau (the authors' code): torch's "
        "ReduceLROnPlateau down to --lr-min, stop after a plateau at --lr-min. Both restore the "
        "weights of the epoch with the lowest validation loss",
        choices=SCHEDULES,
    )
    shuffle: str = setting(
        "epoch",
        "epoch: a new order of the training data every epoch; once: one seeded order "
        "per task, kept for all its epochs (the authors' loaders)",
        choices=SHUFFLES,
    )
    dropout_conv: float = setting(0.0, "dropout after alexnet's first two conv layers", _rate)
    dropout_fc: float = setting(
        0.0,
        "dropout after alexnet's third conv and fully connected layers, and after the mlp's layers",
        _rate,
    )
    clip_heads: float = setting(
        0.0,
        "clip the heads' joint gradient norm at this value before every step, as "
        "the authors do at 10000 (0: no clipping)",
        lambda v: None if math.isfinite(v) and v >= 0 else "must be a finite number >= 0",
    )
    normalize: bool = setting(
        False,
        "standardise image inputs per channel (the authors' means and deviations: "
        "ImageNet's for colour, MNIST's for grey images)",
    )
    bn_stats: str = setting(
        "shared",
        "BatchNorm statistics (resnet18): shared by all tasks, or per-task: stored at "
        "each task's end and used when evaluating that task",
        choices=BN_STATS,
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if self.lr_min > self.lr:
            raise ConfigError("lr_min", f"{self.lr_min} exceeds the learning rate lr={self.lr}")
