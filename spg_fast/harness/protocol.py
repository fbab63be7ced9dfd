"""Protocol presets: ``quick`` (the embedded digits in seconds on a CPU) and ``paper`` (the authors'
setting, UIC-Liu-Lab/SPG's configuration files: SGD lr 0.25 divided by 3 on a plateau down to 1e-3,
patience 5, up to 500 epochs, batch 64, their per-sequence dropout rates, heads' gradient norm
clipped at 10000, inputs standardised). ``resolve`` fills every setting not given explicitly from
the preset and says which those were."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from spg_fast.harness.config import ConfigError, TrainConfig

PROTOCOLS = ("quick", "paper")

# Starting and lowest learning rate per optimizer (quick protocol): SGD's are the harness's measured
# defaults on digits; momentum 0.9 multiplies SGD's effective step by 10, so its rates are a tenth;
# AdamW's are its usual 1e-3.
QUICK_LR = {"sgd": (0.1, 1e-3), "sgd-momentum": (0.01, 1e-4), "adamw": (1e-3, 1e-5)}

# The authors' tuned (conv, fc) dropout rates (their conf/appr/spg.yaml, drop1/drop2).
PAPER_DROPOUT = {
    "cifar100-10": (0.313455931477029, 0.40930567117056715),
    "cifar100-20": (0.49562963280365513, 0.4850322667156278),
    "tinyimagenet-10": (0.12493294838321953, 0.4344091928004977),
    "tinyimagenet-20": (0.3874908901569995, 0.44229703085300165),
    "femnist-10": (0.4921793208978701, 0.4847418191146906),
    "femnist-20": (0.2974548196260386, 0.38867844457851425),
}

VECTOR_SEQUENCES = ("digits", "digits-permuted")


def preset(protocol: str, sequence: str, optimizer: str = "sgd") -> dict[str, Any]:
    """Every setting of ``protocol`` for ``sequence`` with ``optimizer``. The paper's learning rates
    are for SGD; with another optimizer the paper preset keeps the quick protocol's rates for it."""
    if protocol not in PROTOCOLS:
        raise ConfigError("protocol", f"must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if optimizer not in QUICK_LR:
        raise ConfigError("optimizer", f"must be one of {', '.join(QUICK_LR)}, got {optimizer!r}")
    lr, lr_min = QUICK_LR[optimizer]
    values = dict(
        optimizer=optimizer,
        lr=lr,
        lr_min=lr_min,
        lr_factor=3.0,
        lr_patience=3,
        max_epochs=60,
        batch_size=64,
        schedule="divide-stop",
        shuffle="epoch",
        dropout_conv=0.0,
        dropout_fc=0.0,
        clip_heads=0.0,
        normalize=False,
        bn_stats="shared",
    )
    if protocol == "paper":
        conv, fc = PAPER_DROPOUT.get(sequence, (0.0, 0.0))
        values.update(
            lr_patience=5,
            max_epochs=500,
            schedule="plateau",
            shuffle="once",
            dropout_conv=conv,
            dropout_fc=fc,
            clip_heads=10_000.0,
            normalize=sequence not in VECTOR_SEQUENCES,
        )
        if optimizer == "sgd":
            values.update(lr=0.25, lr_min=1e-3)
    return values


def resolve(
    protocol: str, sequence: str, explicit: Mapping[str, Any] | None = None
) -> tuple[TrainConfig, list[str]]:
    """The ``TrainConfig`` of ``protocol`` for ``sequence`` with the ``explicit`` settings
    overriding the preset, and the names of the settings that came from the preset.

    Args:
        protocol: the preset, one of ``PROTOCOLS``.
        sequence: the task sequence's name (the paper preset's dropout rates and input
            standardisation depend on it).
        explicit: settings given explicitly, by ``TrainConfig`` field name (None: none).

    Returns:
        ``(config, from_preset)``: the ``TrainConfig`` and the names of the settings taken from
            the preset.

    Raises:
        ConfigError: an unknown protocol, optimizer or setting name, or a value of the wrong
            kind or out of range.
    """
    explicit = dict(explicit or {})
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(explicit.keys() - names)
    if unknown:
        raise ConfigError(
            unknown[0], f"not a TrainConfig setting (settings: {', '.join(sorted(names))})"
        )
    values = preset(protocol, sequence, explicit.get("optimizer", "sgd"))
    values.update(explicit)
    return TrainConfig(**values), [n for n in values if n not in explicit]
