"""Native CPU soft mask: ``spg_soft_mask_*`` of ``fused_steps.c``, the signatures of the Triton
``soft_mask_`` (``g *= keep``) and ``scale_updates_`` (``p = before + keep * (p - before)``), for
contiguous float32/float64 CPU tensors: one pass, no temporary (the reference decodes narrow keep
factors into temporaries and takes three passes to scale a change). Products and sums round as the
reference's (no fused multiply-add), so the results are the same bits."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

from torch import Tensor

from spg_fast.kernels.cpu.launch import Table


def _apply(
    what: str,
    xs: Sequence[Tensor],
    before: Sequence[Tensor] | None,
    keeps: Sequence[Tensor],
    heads: Sequence[Tensor],
    head_before: Sequence[Tensor] | None,
    scale: Tensor,
) -> None:
    update = before is not None
    targets = [*xs, *heads]
    if not targets:
        return
    table = Table(what, targets, keeps)
    # The C code reads the values before the step through the gradient slot; the soft mask of
    # gradients reads nothing there (it is pointed at the targets themselves).
    table.point([*before, *head_before] if update else targets)
    table.call("soft_mask", table.real(float(scale)), ctypes.c_int(update))


def soft_mask_(
    grads: Sequence[Tensor], keeps: Sequence[Tensor], head_grads: Sequence[Tensor], scale: Tensor
) -> None:
    """``g *= keep`` per shared gradient (its stored keep factors), ``g *= scale`` per head."""
    if len(grads) != len(keeps):
        raise ValueError(f"soft_mask_: got {len(grads)} gradients and {len(keeps)} keep factors")
    _apply("soft_mask_", grads, None, keeps, head_grads, None, scale)


def scale_updates_(
    params: Sequence[Tensor],
    before: Sequence[Tensor],
    keeps: Sequence[Tensor],
    head_params: Sequence[Tensor],
    head_before: Sequence[Tensor],
    scale: Tensor,
) -> None:
    """``p = before + keep * (p - before)`` per shared parameter, ``scale`` for heads; ``before``
    is only read."""
    if len(params) != len(keeps) or len(params) != len(before):
        raise ValueError(
            f"scale_updates_: got {len(params)} parameters, {len(before)} values before the step "
            f"and {len(keeps)} keep factors"
        )
    _apply("scale_updates_", params, before, keeps, head_params, head_before, scale)
