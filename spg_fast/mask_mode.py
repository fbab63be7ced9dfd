"""How SPG's mask enters an optimizer step, and the one rule that picks it (``mask="auto"``).

- ``"gradient"``, the paper's rule: each shared gradient is multiplied by its keep factor
  ``1 - A`` (each head's by the head scale) before the optimizer uses it.
- ``"update"``: the optimizer steps on the unmasked gradient, then the change it made to each
  parameter, weight decay included, is multiplied by the same factors:
  ``p <- p_before + keep * (p_after - p_before)``.
- ``"auto"`` (the default everywhere): ``"gradient"`` for a param group of ``torch.optim.SGD`` or
  ``spg_fast.optim.SGD`` without weight decay, ``"update"`` for everything else.

Why the rule: under SGD without weight decay the step is linear in the gradients (momentum,
dampening and nesterov included), so scaling the gradient scales the update by the same factor and
both modes are one computation; ``"auto"`` then runs the paper's rule exactly, bit for bit. Adaptive
optimizers (Adam, AdamW, RMSprop, Adagrad, ...) divide each element's step by a running estimate of
its own gradient's size, which cancels a fixed per-element gradient scale: gradient masking there
protects nothing measurable, while update masking moves an important element ``1 - A`` as far as it
would move unprotected. Weight decay is added after the gradient mask, so it would shrink important
parameters freely; update masking scales it too. An optimizer this module does not know is masked
on its update, which protects whatever its step does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch

MaskMode = Literal["auto", "gradient", "update"]
MASK_MODES: tuple[str, ...] = ("auto", "gradient", "update")


def check_mask(mask: object, where: str = "mask") -> None:
    """Raise ``ValueError`` naming ``where`` unless ``mask`` is one of ``MASK_MODES``.

    Args:
        mask: the mask mode to check, of any type.
        where: the name the error gives the value (an option or argument name).

    Raises:
        ValueError: ``mask`` is not one of ``MASK_MODES``.
    """
    if mask not in MASK_MODES:
        raise ValueError(f"{where}={mask!r} is not one of {', '.join(map(repr, MASK_MODES))}")


def _linear_in_gradient(optimizer: torch.optim.Optimizer) -> bool:
    from spg_fast.optim.sgd import SGD  # spg_fast.optim imports this module

    return type(optimizer) in (torch.optim.SGD, SGD)


def resolve(
    mask: MaskMode, optimizer: torch.optim.Optimizer, group: Mapping[str, Any]
) -> Literal["gradient", "update"]:
    """The mode one param group of ``optimizer`` is masked in: ``mask`` itself unless it is
    ``"auto"``, which the module docstring resolves.

    Args:
        mask: ``"auto"``, ``"gradient"`` or ``"update"`` (not checked here: see ``check_mask``).
        optimizer: the optimizer the group belongs to; for ``"auto"`` only its exact type counts
            (a subclass of ``torch.optim.SGD`` gets ``"update"``).
        group: the param group; a missing or zero ``"weight_decay"`` counts as none.

    Returns:
        ``"gradient"`` or ``"update"``.
    """
    if mask != "auto":
        return mask
    if _linear_in_gradient(optimizer) and not group.get("weight_decay"):
        return "gradient"
    return "update"
