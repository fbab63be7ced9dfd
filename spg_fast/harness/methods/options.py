"""The methods' own settings (``MethodOptions``), with the authors' values as defaults: SPG's mask
mode, HAT's (Serra et al. 2018, their code's defaults) and EWC's penalty weight. Each applies to one
method; the command line builds one option per field (``--mask``, ``--hat-smax``, ...)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from spg_fast.harness.config import check_fields, positive, setting

MASK_MODES = ("auto", "gradient", "update")


def _at_least_zero(v: float) -> str | None:
    return None if math.isfinite(v) and v >= 0 else "must be a finite number >= 0"


def _above_one(v: float) -> str | None:
    return None if math.isfinite(v) and v > 1 else "must be a finite number > 1"


@dataclass(frozen=True)
class MethodOptions:
    """Settings of the methods beyond the training protocol; ``for_method`` gives one method's.

    Attributes:
        mask: what SPG's importance scales: ``auto``, ``gradient`` or ``update``.
        hat_smax: HAT's largest gate slope s_max, reached at the end of every epoch.
        hat_c: HAT's weight c of the attention regulariser.
        hat_clipgrad: HAT clips the whole network's gradient norm at this value.
        hat_thres_cosh: HAT clamps s * e to +-this value in the embeddings' gradient compensation.
        hat_thres_emb: HAT clamps the gate embeddings to +-this value after every step.
        ewc_lambda: EWC's penalty weight lambda.

    Raises:
        ConfigError: a value of the wrong kind or out of range.
    """

    mask: str = setting(
        "auto",
        "what SPG's importance scales: auto (gradient under plain SGD, update under every other "
        "optimizer), gradient (the paper's rule) or update (the step's change)",
        choices=MASK_MODES,
        method="spg",
    )
    hat_smax: float = setting(
        400.0,
        "HAT's largest gate slope s_max, reached at the end of every epoch",
        _above_one,
        method="hat",
    )
    hat_c: float = setting(
        0.75, "HAT's weight c of the attention regulariser", _at_least_zero, method="hat"
    )
    hat_clipgrad: float = setting(
        10_000.0,
        "HAT clips the whole network's gradient norm at this value",
        positive,
        method="hat",
    )
    hat_thres_cosh: float = setting(
        50.0,
        "HAT clamps s * e to +-this value in the embeddings' gradient compensation",
        positive,
        method="hat",
    )
    hat_thres_emb: float = setting(
        6.0,
        "HAT clamps the gate embeddings to +-this value after every step",
        positive,
        method="hat",
    )
    ewc_lambda: float = setting(
        5000.0,
        "EWC's penalty weight lambda in lambda/2 * F * (theta - theta*)^2",
        _at_least_zero,
        method="ewc",
    )

    def __post_init__(self) -> None:
        check_fields(self)

    def for_method(self, method: str) -> dict[str, Any]:
        """The settings that apply to ``method`` (none for finetune and one).

        Args:
            method: the method's name, one of ``METHODS``.

        Returns:
            ``{field name: value}`` for the fields of this method (empty for any other name).
        """
        return {
            f.name: getattr(self, f.name) for f in fields(self) if f.metadata["method"] == method
        }


def applies_to(name: str) -> str:
    """The method the option ``name`` applies to."""
    return next(f.metadata["method"] for f in fields(MethodOptions) if f.name == name)
