"""Native CPU soft mask: ``spg_soft_mask_*`` of ``fused_steps.c``, prepared for fixed tensors
(``SoftMask``, the interface of the Triton one) or called once (``soft_mask_``: ``g *= keep``;
``scale_updates_``: ``p = before + keep * (p - before)``), for contiguous float32/float64 CPU
tensors of one dtype: one pass, no temporary (the reference decodes narrow keep factors into
temporaries and takes three passes to scale a change). Products and sums round as the reference's
(no fused multiply-add), so the results are the same bits."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

from torch import Tensor

from spg_fast.kernels.cpu.launch import Table


class SoftMask:
    """SPG's mask prepared for fixed targets (``xs`` shared with their stored ``keeps``, then
    ``heads``): without ``before`` it masks the gradients it is called with, laid out as the
    targets; with ``before`` (values before a step, kept where they are) it scales the change a
    step made to the targets, called with no gradients. ``scale`` is the head scale."""

    def __init__(
        self,
        xs: Sequence[Tensor],
        keeps: Sequence[Tensor],
        heads: Sequence[Tensor],
        before: Sequence[Tensor] | None = None,
        head_before: Sequence[Tensor] | None = None,
    ) -> None:
        self._targets = [*xs, *heads]
        self._update = before is not None
        self._table = Table("soft mask", self._targets, keeps) if self._targets else None
        if self._table is not None and self._update:
            # The C code reads the values before the step through the gradient slot.
            self._table.point([*before, *head_before])

    def __call__(
        self, grads: Sequence[Tensor] | None, head_grads: Sequence[Tensor] | None, scale: Tensor
    ) -> None:
        if self._table is None:
            return
        if not self._update:
            # The gradients are the targets; the gradient slot is not read.
            targets = self._targets if grads is None else [*grads, *head_grads]
            self._table.retarget(targets)
        # The C code reads the head scale itself, in the parameters' dtype: no host read here.
        head = scale if scale.dtype == self._table.dtype else scale.to(self._table.dtype)
        self._table.call("soft_mask", ctypes.c_void_p(head.data_ptr()), ctypes.c_int(self._update))


def soft_mask_(
    grads: Sequence[Tensor], keeps: Sequence[Tensor], head_grads: Sequence[Tensor], scale: Tensor
) -> None:
    """``g *= keep`` per shared gradient (its stored keep factors), ``g *= scale`` per head."""
    if len(grads) != len(keeps):
        raise ValueError(f"soft_mask_: got {len(grads)} gradients and {len(keeps)} keep factors")
    SoftMask(grads, keeps, head_grads)(None, None, scale)


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
    SoftMask(params, keeps, head_params, before, head_before)(None, None, scale)
