"""Launch geometry shared by the multi-tensor kernels: tile tables, pointer tables and
layout checks.

Every kernel processes a list of tensors in one launch: program ``i`` handles the ``BLOCK`` elements
starting at ``tile_start[i]`` of tensor ``tile_tensor[i]``, whose data pointer it reads from a
pointer table. Offsets are int64, so tensors of more than 2**31 elements are addressed correctly.
Elements are addressed in storage order, so paired tensors (a gradient and its importance, a
parameter and its optimizer state) must share one dense layout; the launchers route any other tensor
through a dense temporary.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton.language as tl
from torch import Tensor

# Elements per program. 1024 fp32 elements with 4 warps is 8 per thread: two 16-byte vectors.
# Measured on an H100 (python -m bench.tune,
# bench/results/NVIDIA-H100-80GB-HBM3-2026-11-22/2-tune/tune.txt): at 1e8 and 1e9 parameters the
# mask, masked SGD and masked AdamW kernels reach 100-103% of copy bandwidth with 1024/4; 2048-8192
# elements and 8 warps were never faster and some were far slower (AdamW 2048/4: 59%, 8192/4: 13%).
BLOCK = 1024
NUM_WARPS = 4
# Launch plans kept (see launch_plan): one per (tensor lists, device) a model steps with; a few
# models per process.
PLAN_CACHE_SIZE = 64
# Pointer element types of the tensor dtypes the kernels take.
TL_DTYPES = {
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    torch.uint8: tl.uint8,
}


def is_dense(t: Tensor) -> bool:
    """True when ``t``'s elements fill its storage span exactly, in some dimension order
    (channels_last too)."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted(
        (st, s) for s, st in zip(t.shape, t.stride(), strict=True) if s != 1
    ):
        if stride != expected:
            return False
        expected *= size
    return True


def same_layout(a: Tensor, b: Tensor) -> bool:
    """True when ``a`` and ``b`` have one shape and place every element at the same
    storage offset."""
    if a.shape != b.shape:
        return False
    return all(
        sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride(), strict=True) if n != 1
    )


def dense_like(t: Tensor, ref: Tensor) -> Tensor:
    """``t`` itself when it is dense with ``ref``'s layout; else a copy of it in ``ref``'s
    (dense) layout."""
    if same_layout(t, ref) and is_dense(t):
        return t
    out = torch.empty_like(ref, dtype=t.dtype)
    out.copy_(t)
    return out


def dense(t: Tensor) -> Tensor:
    """``t`` itself when dense; else a contiguous copy."""
    return t if is_dense(t) else t.contiguous()


def write_back(originals: Sequence[Tensor], work: Sequence[Tensor]) -> None:
    """Copy each dense working tensor that ``dense``/``dense_like`` made back into the tensor it
    stands for."""
    if work is originals:  # the launch addressed the tensors themselves
        return
    for original, w in zip(originals, work, strict=True):
        if w is not original:
            original.copy_(w)


@functools.lru_cache(maxsize=128)
def _tiles(
    numels: tuple[int, ...], block: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    counts = torch.tensor([-(-n // block) for n in numels], dtype=torch.int64)
    first = torch.cumsum(counts, 0) - counts
    tile_tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)
    tile_start = (torch.arange(int(counts.sum()), dtype=torch.int64) - first[tile_tensor]) * block
    numel_table = torch.tensor(numels, dtype=torch.int64)
    return tuple(t.to(device) for t in (tile_tensor, tile_start, numel_table))  # type: ignore[return-value]


def tile_table(
    tensors: Sequence[Tensor], device: torch.device, block: int = BLOCK
) -> tuple[Tensor, Tensor, Tensor]:
    """``(tile_tensor, tile_start, numels)`` int64 tables on ``device``; cached by the
    tensors' sizes."""
    return _tiles(tuple(t.numel() for t in tensors), block, device)


@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def first_tiles(
    numels: tuple[int, ...], device: torch.device, block: int = BLOCK
) -> tuple[Tensor, Tensor]:
    """Per tensor of ``numels`` elements, the index of its first tile and its number of tiles (for
    per-tensor reductions over tiles); cached."""
    counts = torch.tensor([-(-n // block) for n in numels], dtype=torch.int64)
    return (torch.cumsum(counts, 0) - counts).to(device), counts.to(device)


def to_device(values: list[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small host-built table on ``device``, copied through pinned memory so the copy never blocks
    the host."""
    table = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table


def pointer_table(
    tensors: Sequence[Tensor | None], device: torch.device, length: int | None = None
) -> Tensor:
    """Data pointers of ``tensors`` as an int64 tensor on ``device``; padded with 0 (for None, and
    up to ``length``) so that every program can read its entry in bounds."""
    pointers = [0 if t is None else t.data_ptr() for t in tensors]
    return to_device(pointers + [0] * ((length or 0) - len(pointers)), torch.int64, device)


@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def flag_table(flags: tuple[bool, ...], device: torch.device) -> Tensor:
    """Per-tensor int8 flags on ``device`` (SGD's first-step flags), cached: they change only when a
    parameter gets its momentum buffer."""
    return to_device([int(f) for f in flags], torch.int8, device)


def aligned(tensors: Sequence[Tensor | None], nbytes: int = 16) -> bool:
    """True when every data pointer is a multiple of ``nbytes`` (lets the kernels use
    vector loads)."""
    return all(t is None or t.data_ptr() % nbytes == 0 for t in tensors)


class LaunchPlan(NamedTuple):
    """What a multi-tensor launch needs on the device, built once for a set of tensor lists and
    reused while they keep their data pointers and sizes: one pointer table per list, the tile
    tables, and whether every pointer is 16-byte aligned (every list counted: parameters, gradients,
    importances and optimizer state)."""

    pointers: tuple[Tensor, ...]
    tile_tensor: Tensor
    tile_start: Tensor
    numels: Tensor
    aligned: bool

    @property
    def grid(self) -> tuple[int]:
        return (self.tile_tensor.numel(),)


_PLANS: dict[tuple, LaunchPlan] = {}


def _pairs_with_first(lists: Sequence[Sequence[Tensor]]) -> bool:
    """True when every tensor of every list is dense and laid out like its counterpart in the first
    list, so that the kernels can address all of them by one storage offset."""
    first = lists[0]
    return all(map(is_dense, first)) and all(
        same_layout(t, ref) for lst in lists[1:] for t, ref in zip(lst, first, strict=False)
    )


def _check(
    lists: Sequence[Sequence[Tensor]], device: torch.device, scalars: Sequence[Tensor]
) -> None:
    """Refuse what the kernels cannot address: a tensor on another device than the launch's, or a
    tensor subclass (FSDP2's DTensor: its data pointer is not the memory of its elements)."""
    for i, lst in enumerate([*lists, scalars]):
        for j, t in enumerate(lst):
            if type(t) not in (Tensor, torch.nn.Parameter):
                raise TypeError(
                    f"tensor {j} of list {i} is a {type(t).__name__}, a tensor subclass the "
                    "kernels cannot address; pass plain tensors (e.g. a DTensor's to_local())"
                )
            if t.device != device:
                raise ValueError(
                    f"tensor {j} of list {i} (shape {tuple(t.shape)}) is on {t.device}, "
                    f"the launch on {device}"
                )


def _build(
    lists: Sequence[Sequence[Tensor]], device: torch.device, scalars: Sequence[Tensor], block: int
) -> LaunchPlan:
    _check(lists, device, scalars)
    length = len(lists[0])
    tables = [pointer_table(lst, device, length) for lst in lists]
    if scalars:
        tables.append(pointer_table(scalars, device, length))
    tile_tensor, tile_start, numels = tile_table(lists[0], device, block)
    return LaunchPlan(
        tuple(tables), tile_tensor, tile_start, numels, aligned([t for lst in lists for t in lst])
    )


def launch_plan(
    lists: Sequence[Sequence[Tensor]],
    device: torch.device,
    scalars: Sequence[Tensor] = (),
    block: int = BLOCK,
) -> LaunchPlan | None:
    """The cached plan for ``lists`` (the first list sets the tiling; shorter lists are padded with
    null pointers) and ``scalars`` (one device scalar per tensor, e.g. Adam's step counts: its
    pointer table comes last), or None when some tensor is not dense in its first-list partner's
    layout. A steady-state step costs one read of each tensor's data pointer (and the first list's
    sizes): no allocation, no copy to the device, no synchronisation. A plan is rebuilt when any
    pointer or size changes (gradients that landed elsewhere after ``zero_grad(set_to_none=True)``,
    a new head, ``load_state_dict``)."""
    # Every list of a step pairs element-wise with the first (same shapes, checked when the plan is
    # built), so the first list's sizes and every data pointer identify the plan; the lengths make
    # the flat key unambiguous.
    key = (
        device,
        block,
        len(scalars),
        len(lists),
        *map(len, lists),
        *map(Tensor.numel, lists[0]),
        *map(Tensor.data_ptr, itertools.chain(scalars, *lists)),
    )
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    if not _pairs_with_first(lists):
        return None
    plan = _PLANS[key] = _build(lists, device, scalars, block)
    if len(_PLANS) > PLAN_CACHE_SIZE:
        del _PLANS[
            next(iter(_PLANS))
        ]  # the oldest: a model steps with few plans, so order of use is not tracked
    return plan


def plan_for(
    lists: Sequence[Sequence[Tensor]], device: torch.device, scalars: Sequence[Tensor] = ()
) -> tuple[LaunchPlan, Sequence[Sequence[Tensor]]]:
    """The plan for ``lists`` and the tensors it addresses: the lists themselves (cached plan), or,
    when some tensor is not dense in its partner's layout, dense copies in the first list's layout
    (a one-off plan; the caller copies the lists it mutates back with ``write_back``)."""
    plan = launch_plan(lists, device, scalars)
    if plan is not None:
        return plan, lists
    first = [dense(t) for t in lists[0]]
    work = [
        first,
        *([dense_like(t, ref) for t, ref in zip(lst, first, strict=False)] for lst in lists[1:]),
    ]
    return _build(work, device, scalars, BLOCK), work
