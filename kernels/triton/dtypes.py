"""The tensor dtypes the Triton kernels take, and the argument checks the launchers share (no Triton
import, so the backend can ask without Triton installed)."""

from collections.abc import Sequence

import torch
from torch import Tensor

GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The stored keep factors the kernels read (spg_fast.storage).
KEEP_DTYPES = (torch.float32, torch.bfloat16, torch.uint8)


def check_pairs(
    op: str, first: Sequence[Tensor], second: Sequence[Tensor], names: tuple[str, str]
) -> None:
    """Two lists that pair up element-wise: as many tensors, of the same shapes."""
    if len(first) != len(second):
        raise ValueError(
            f"{op}: got {len(first)} {names[0]} and {len(second)} {names[1]}; "
            "the lists must pair up"
        )
    for i, (a, b) in enumerate(zip(first, second, strict=True)):
        if a.shape != b.shape:
            raise ValueError(f"{op}: tensor {i} has shapes {tuple(a.shape)} and {tuple(b.shape)}")


def check_dtypes(
    op: str, tensors: Sequence[Tensor], allowed: tuple[torch.dtype, ...], name: str
) -> None:
    """Every tensor of a dtype the kernel takes."""
    for i, t in enumerate(tensors):
        if t.dtype not in allowed:
            raise TypeError(f"{op} (triton): {name} {i} has dtype {t.dtype}; supported: {allowed}")
