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

from collections.abc import Iterable, Sequence

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


def tile_table(
    tensors: Sequence[Tensor], device: torch.device, block: int = BLOCK
) -> tuple[Tensor, Tensor, Tensor]:
    """``(tile_tensor, tile_start, numels)`` int64 tables on ``device`` for ``tensors``' sizes."""
    numels = [t.numel() for t in tensors]
    counts = torch.tensor([-(-n // block) for n in numels], dtype=torch.int64)
    first = torch.cumsum(counts, 0) - counts
    tile_tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)
    tile_start = (torch.arange(int(counts.sum()), dtype=torch.int64) - first[tile_tensor]) * block
    numel_table = torch.tensor(numels, dtype=torch.int64)
    return tuple(to_device(t, device) for t in (tile_tensor, tile_start, numel_table))  # type: ignore[return-value]


def first_tiles(
    tensors: Sequence[Tensor], device: torch.device, block: int = BLOCK
) -> tuple[Tensor, Tensor]:
    """Per tensor, the index of its first tile and its number of tiles (for per-tensor reductions
    over tiles)."""
    counts = torch.tensor([-(-t.numel() // block) for t in tensors], dtype=torch.int64)
    return to_device(torch.cumsum(counts, 0) - counts, device), to_device(counts, device)


def to_device(
    table: Tensor | list[int], device: torch.device, dtype: torch.dtype = torch.int64
) -> Tensor:
    """A small host-built table on ``device``, copied through pinned memory so the copy never blocks
    the host."""
    table = torch.as_tensor(table, dtype=dtype)
    if device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table


def _pointers(tensors: Sequence[Tensor | None], length: int) -> list[int]:
    """Data pointers of ``tensors`` (0 for None), padded with 0 up to ``length`` so that every
    program can read its entry in bounds."""
    return [0 if t is None else t.data_ptr() for t in tensors] + [0] * (length - len(tensors))


def pointer_table(
    tensors: Sequence[Tensor | None], device: torch.device, length: int | None = None
) -> Tensor:
    """Data pointers of ``tensors`` as an int64 tensor on ``device`` (0 for None), padded with 0 up
    to ``length``."""
    return to_device(_pointers(tensors, length or len(tensors)), device)


def aligned(pointers: Iterable[int], nbytes: int = 16) -> bool:
    """True when every data pointer is a multiple of ``nbytes`` (lets the kernels use
    vector loads)."""
    return all(p % nbytes == 0 for p in pointers)


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


class LaunchPlan:
    """What a multi-tensor launch needs on the device: one pointer table per tensor list (the first
    list sets the tiling; shorter lists are padded with null pointers; ``scalars``, one device
    scalar per tensor such as Adam's step counts, get a table last), the tile tables, and whether
    every pointer is 16-byte aligned.

    The plan belongs to whoever built it (a prepared step, a one-off launch) and lives as long as
    that owner; it holds the tensors it points at. ``refresh(i, tensors)`` points list ``i`` at
    other tensors of the same sizes and layout (the gradients, which ``zero_grad(set_to_none=True)``
    replaces every step): only when some pointer changed is that table rewritten, in place, so its
    device address never changes. Build with ``fits(lists)`` true (every tensor dense in its
    first-list partner's layout).
    """

    def __init__(
        self,
        lists: Sequence[Sequence[Tensor]],
        device: torch.device,
        scalars: Sequence[Tensor] = (),
        block: int = BLOCK,
    ) -> None:
        _check(lists, device, scalars)
        self.device = device
        self._lists = [list(lst) for lst in lists] + ([list(scalars)] if scalars else [])
        length = len(lists[0])
        self._values = [_pointers(lst, length) for lst in self._lists]
        self.pointers = tuple(to_device(v, device) for v in self._values)
        self.tile_tensor, self.tile_start, self.numels = tile_table(lists[0], device, block)
        self._aligned = [aligned(v) for v in self._values]
        self.aligned = all(self._aligned)

    @staticmethod
    def fits(lists: Sequence[Sequence[Tensor]]) -> bool:
        """Whether one plan can address ``lists`` directly (see the class docstring)."""
        return _pairs_with_first(lists)

    @property
    def grid(self) -> tuple[int]:
        return (self.tile_tensor.numel(),)

    def refresh(self, index: int, tensors: Sequence[Tensor]) -> bool:
        """Point list ``index`` at ``tensors``; False (and nothing changed) when one is not laid out
        as its partner in the first list, so the caller takes a one-off ``plan_for`` instead."""
        values = _pointers(tensors, len(self._values[index]))
        if values == self._values[index]:
            return True
        reference = self._lists[0]
        if len(tensors) != len(reference):
            return False
        device, plain = self.device, (Tensor, torch.nn.Parameter)
        for t, r in zip(tensors, reference, strict=True):  # one pass: what the kernel can address
            if type(t) not in plain or t.device != device:
                _check([tensors], device, ())  # raises, naming the tensor
            if t.stride() != r.stride() and not same_layout(t, r):
                return False
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "a multi-tensor launch's tensors moved while a CUDA graph was being captured; "
                "run the step once before capturing, and keep its tensors (gradients included) "
                "where they are"
            )
        self.pointers[index].copy_(to_device(values, self.device), non_blocking=True)
        self._values[index] = values
        self._lists[index] = list(tensors)
        self._aligned[index] = aligned(values)
        self.aligned = all(self._aligned)
        return True


def plan_for(
    lists: Sequence[Sequence[Tensor]], device: torch.device, scalars: Sequence[Tensor] = ()
) -> tuple[LaunchPlan, Sequence[Sequence[Tensor]]]:
    """A one-off plan for ``lists`` and the tensors it addresses: the lists themselves, or, when
    some tensor is not dense in its partner's layout, dense copies in the first list's layout (the
    caller copies the lists it mutates back with ``write_back``)."""
    if LaunchPlan.fits(lists):
        return LaunchPlan(lists, device, scalars), lists
    first = [dense(t) for t in lists[0]]
    work = [
        first,
        *([dense_like(t, ref) for t, ref in zip(lst, first, strict=False)] for lst in lists[1:]),
    ]
    return LaunchPlan(work, device, scalars), work
