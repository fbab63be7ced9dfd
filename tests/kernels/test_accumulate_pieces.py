"""The Triton statistics kernels on pieces of tensors, as FSDP2 uses them: the moments of each
rank's shards, merged (``spg_fast.reference.merge_moments``), then the update of each shard with the
whole tensor's statistics, equal to the one-process update of the whole tensor."""

from __future__ import annotations

import pytest
import torch

from spg_fast import reference, storage
from spg_fast.kernels.triton.accumulate import accumulate_, accumulate_with_, moments
from tests.kernels.common import DEVICE


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stored_as", [torch.float32, torch.uint8])
def test_merged_moments_of_pieces_update_each_piece_as_the_whole(dtype, stored_as):
    gen = torch.Generator().manual_seed(3)
    wholes = [torch.randn(n, generator=gen).mul(3).add(1).to(dtype).to(DEVICE) for n in (2051, 7)]
    wholes.append(torch.full((9,), 0.25, dtype=dtype, device=DEVICE))  # constant: importance 0
    cuts = [1000, 3, 0]  # the second rank's shard of the last tensor is empty
    pieces = [[w[:c] for w, c in zip(wholes, cuts, strict=True)],
              [w[c:] for w, c in zip(wholes, cuts, strict=True)]]  # fmt: skip
    ours = moments(pieces[0]), moments(pieces[1])
    for piece, got in zip(pieces, ours, strict=True):
        torch.testing.assert_close(got, reference.moments_of(piece), rtol=1e-12, atol=1e-12)
    merged = reference.merge_moments(torch.stack(ours))
    expected = [storage.fresh(w.shape, stored_as, DEVICE) for w in wholes]
    assert not accumulate_(expected, wholes).any()
    for rank, piece in enumerate(pieces):
        stored = [storage.fresh(p.shape, stored_as, DEVICE) for p in piece]
        assert not accumulate_with_(stored, piece, merged).any()
        for got, want, cut in zip(stored, expected, cuts, strict=True):
            part = want[:cut] if rank == 0 else want[cut:]
            assert torch.equal(got, part)


def test_a_non_finite_whole_flags_every_piece_and_changes_nothing():
    whole = torch.randn(50, device=DEVICE)
    whole[40] = float("nan")
    pieces = [whole[:30], whole[30:]]
    merged = reference.merge_moments(torch.stack([moments([p]) for p in pieces]))
    for piece in pieces:
        stored = [storage.fresh(piece.shape, torch.float32, DEVICE)]
        assert accumulate_with_(stored, [piece], merged).tolist() == [True]
        assert torch.equal(stored[0], torch.ones_like(piece))
