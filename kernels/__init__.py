"""Triton kernels for SPG, installed as ``spg_fast.kernels``; each is a ``torch.library`` custom op whose contract
is that of its reference in ``spg_fast.reference`` (see each module)."""

from spg_fast.kernels.importance import importance_max_
from spg_fast.kernels.soft_mask import soft_mask_

__all__ = ["importance_max_", "soft_mask_"]
