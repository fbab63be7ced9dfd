"""The one place that chooses which implementation of SPG's tensor operations runs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from spg_fast import reference

BACKENDS = ("auto", "torch")


@dataclass(frozen=True)
class Ops:
    """SPG's tensor operations as one backend implements them; signatures as in ``spg_fast.reference``."""

    name: str
    importance_max_: Callable[[Sequence[Tensor], Sequence[Tensor]], Tensor]
    keep_factors: Callable[[Sequence[Tensor]], list[Tensor]]
    head_scale: Callable[[Sequence[Tensor]], Tensor]
    soft_mask_: Callable[[Sequence[Tensor], Sequence[Tensor], Sequence[Tensor], Tensor], None]


TORCH_OPS = Ops(
    name="torch",
    importance_max_=reference.importance_max_,
    keep_factors=reference.keep_factors,
    head_scale=reference.head_scale,
    soft_mask_=reference.soft_mask_,
)


def resolve_backend(backend: str, device: torch.device) -> Ops:
    """The ops for ``backend`` (one of ``BACKENDS``) on tensors that live on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")
    return TORCH_OPS
