"""What SPG keeps alive: its stored keep factors and one head-scale scalar, nothing else (no float32
copy of the keep factors), in every storage format, after end_task and masked training steps on
every path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.memory import held_bytes
from spg_fast import SPG, optim
from tests.helpers import MultiHeadNet, make_tasks


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_spg_holds_its_stored_keep_factors_and_a_scalar(dtype, backend):
    torch.manual_seed(0)
    model = MultiHeadNet()
    spg = SPG(model, heads=model.heads, backend=backend, importance_dtype=dtype)
    tasks = make_tasks()
    spg.end_task(0, tasks[0])
    fused = optim.AdamW(model.trunk.parameters(), lr=1e-3, spg=spg)
    wrapped = spg.wrap(torch.optim.SGD(model.heads.parameters(), lr=0.1))
    for x, y in tasks[1][:2]:
        fused.zero_grad()
        wrapped.zero_grad()
        F.cross_entropy(model(x, 1), y).backward()
        fused.step()
        wrapped.step()
    spg.mask_gradients()
    shared = sum(p.numel() for p in spg.shared_parameters.values())
    assert held_bytes(spg) == shared * dtype.itemsize + 4  # + the float32 head scale
