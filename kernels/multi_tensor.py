"""Launch geometry shared by the multi-tensor kernels: tile tables, pointer tables and layout checks.

Every kernel processes a list of tensors in one launch: program ``i`` handles the ``BLOCK`` elements starting at
``tile_start[i]`` of tensor ``tile_tensor[i]``, whose data pointer it reads from a pointer table. Offsets are int64,
so tensors of more than 2**31 elements are addressed correctly. Elements are addressed in storage order, so paired
tensors (a gradient and its importance, a parameter and its optimizer state) must share one dense layout; the
launchers route any other tensor through a dense temporary.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton.language as tl
from torch import Tensor

# Elements per program. 1024 fp32 elements with 4 warps is 8 per thread: two 16-byte vectors. Not yet tuned on a
# GPU (none was available when this was written); bench/ is where a measured value belongs.
BLOCK = 1024
NUM_WARPS = 4
# Pointer element types of the tensor dtypes the kernels take.
TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def is_dense(t: Tensor) -> bool:
    """True when ``t``'s elements fill its storage span exactly, in some dimension order (channels_last too)."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride(), strict=True) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def same_layout(a: Tensor, b: Tensor) -> bool:
    """True when ``a`` and ``b`` have one shape and place every element at the same storage offset."""
    if a.shape != b.shape:
        return False
    return all(sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride(), strict=True) if n != 1)


def dense_like(t: Tensor, ref: Tensor) -> Tensor:
    """``t`` itself when it is dense with ``ref``'s layout; else a copy of it in ``ref``'s (dense) layout."""
    if same_layout(t, ref) and is_dense(t):
        return t
    out = torch.empty_like(ref, dtype=t.dtype)
    out.copy_(t)
    return out


def dense(t: Tensor) -> Tensor:
    """``t`` itself when dense; else a contiguous copy."""
    return t if is_dense(t) else t.contiguous()


def write_back(originals: Sequence[Tensor], work: Sequence[Tensor]) -> None:
    """Copy each dense working tensor that ``dense``/``dense_like`` made back into the tensor it stands for."""
    for original, w in zip(originals, work, strict=True):
        if w is not original:
            original.copy_(w)


@functools.lru_cache(maxsize=128)
def _tiles(numels: tuple[int, ...], block: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    counts = torch.tensor([-(-n // block) for n in numels], dtype=torch.int64)
    first = torch.cumsum(counts, 0) - counts
    tile_tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)
    tile_start = (torch.arange(int(counts.sum()), dtype=torch.int64) - first[tile_tensor]) * block
    numel_table = torch.tensor(numels, dtype=torch.int64)
    return tuple(t.to(device) for t in (tile_tensor, tile_start, numel_table))  # type: ignore[return-value]


def tile_table(tensors: Sequence[Tensor], device: torch.device, block: int = BLOCK) -> tuple[Tensor, Tensor, Tensor]:
    """``(tile_tensor, tile_start, numels)`` int64 tables on ``device``; cached by the tensors' sizes."""
    return _tiles(tuple(t.numel() for t in tensors), block, device)


def first_tiles(tensors: Sequence[Tensor], device: torch.device, block: int = BLOCK) -> tuple[Tensor, Tensor]:
    """Per tensor, the index of its first tile and its number of tiles (for per-tensor reductions over tiles)."""
    counts = torch.tensor([-(-t.numel() // block) for t in tensors], dtype=torch.int64)
    return (torch.cumsum(counts, 0) - counts).to(device), counts.to(device)


def to_device(values: list[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small host-built table on ``device``, copied through pinned memory so the copy never blocks the host."""
    table = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table


def pointer_table(tensors: Sequence[Tensor | None], device: torch.device, length: int | None = None) -> Tensor:
    """Data pointers of ``tensors`` as an int64 tensor on ``device``; padded with 0 (for None, and up to
    ``length``) so that every program can read its entry in bounds."""
    pointers = [0 if t is None else t.data_ptr() for t in tensors]
    return to_device(pointers + [0] * ((length or 0) - len(pointers)), torch.int64, device)


def aligned(tensors: Sequence[Tensor | None], nbytes: int = 16) -> bool:
    """True when every data pointer is a multiple of ``nbytes`` (lets the kernels use vector loads)."""
    return all(t is None or t.data_ptr() % nbytes == 0 for t in tensors)
