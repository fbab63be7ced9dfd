"""Launch geometry: tile tables (int64 past 2**31 elements), layout checks and padded
pointer tables."""

from __future__ import annotations

import torch

from spg_fast.kernels.triton.multi_tensor import (
    BLOCK,
    dense_like,
    is_dense,
    pointer_table,
    same_layout,
    tile_table,
)


class _Sized:
    """Stands in for a tensor of ``n`` elements without allocating it."""

    def __init__(self, n: int) -> None:
        self.n = n

    def numel(self) -> int:
        return self.n


def test_tile_table_addresses_tensors_beyond_2_31_elements():
    big = 2**31 + 5
    tile_tensor, tile_start, numels = tile_table(
        [_Sized(3), _Sized(big), _Sized(0), _Sized(BLOCK)], torch.device("cpu")
    )
    assert tile_tensor.dtype == tile_start.dtype == numels.dtype == torch.int64
    counts = torch.bincount(tile_tensor, minlength=4).tolist()
    assert counts == [1, -(-big // BLOCK), 0, 1]
    last_big = tile_start[tile_tensor == 1].max().item()
    assert last_big == (big - 1) // BLOCK * BLOCK and last_big >= 2**31  # beyond int32
    assert numels.tolist() == [3, big, 0, BLOCK]


def test_layouts():
    x = torch.zeros(4, 6)
    assert (
        is_dense(x)
        and is_dense(x.t())
        and is_dense(torch.zeros(2, 3, 4, 5).to(memory_format=torch.channels_last))
    )
    assert not is_dense(x[:, ::2]) and not is_dense(x[1:3, 1:])
    assert same_layout(x.t(), torch.zeros(4, 6).t()) and not same_layout(x.t(), torch.zeros(6, 4))
    assert (
        dense_like(x.t(), torch.zeros(6, 4).t().contiguous().t()) is not x.t()
    )  # different order: copied
    view = x.t()
    assert dense_like(view, torch.zeros(4, 6).t()) is view


def test_pointer_table_pads_with_null():
    a = torch.zeros(3)
    table = pointer_table([a, None], torch.device("cpu"), length=4)
    assert table.tolist() == [a.data_ptr(), 0, 0, 0]
