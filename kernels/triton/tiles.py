"""Tile-level helpers shared by the kernels: which tensor and elements a program owns, and
bounds-aware access.

A program owns one tile of ``BLOCK`` elements of one tensor. Full tiles are accessed without a
bounds mask, which is what lets the compiler emit 16-byte vector loads and stores (the mask
``offs < n`` with ``n`` read from memory has no known constancy); only each tensor's last tile is
masked. ``ALIGNED`` tells the compiler the data pointers are 16-byte aligned, which the launchers
check on the host.
"""

import triton
import triton.language as tl


@triton.jit
def tile_of(tile_tensor, tile_start, numels, BLOCK: tl.constexpr):
    """``(t, offs, n, full)``: this program's tensor index, element offsets (int64), that tensor's
    element count, and whether the tile lies wholly inside the tensor (so it can go unmasked)."""
    pid = tl.program_id(0)
    t = tl.load(tile_tensor + pid)
    start = tl.multiple_of(tl.load(tile_start + pid), BLOCK)
    n = tl.load(numels + t)
    return t, start + tl.arange(0, BLOCK), n, start + BLOCK <= n


@triton.jit
def tensor_ptr(ptrs, t, DT: tl.constexpr, ALIGNED: tl.constexpr):
    """Data pointer of tensor ``t`` from a pointer table, typed as ``DT``."""
    p = tl.load(ptrs + t).to(tl.pointer_type(DT))
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def load(ptr, offs, inside, MASKED: tl.constexpr):
    if MASKED:
        x = tl.load(ptr + offs, mask=inside, other=0.0)
    else:
        x = tl.load(ptr + offs)
    return x


@triton.jit
def store(ptr, offs, value, inside, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + offs, value, mask=inside)
    else:
        tl.store(ptr + offs, value)
