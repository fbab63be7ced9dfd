"""SPG's mask state (the stored keep factors, the head scale) keeps its tensors once it exists:
end_task and load_state_dict copy into them, so pointers captured in a CUDA graph or cached in a
launch plan stay valid."""

from __future__ import annotations

import pytest
import torch

from spg_fast import SPG
from tests.helpers import MultiHeadNet, make_tasks


def _pointers(spg: SPG) -> list[int]:
    _, keeps, _ = spg._mask_split(list(spg.shared_parameters.values()))
    return [t.data_ptr() for t in (*spg.keep_factors.values(), *keeps, spg.head_scale)]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_later_tasks_and_loads_update_the_same_tensors(backend):
    torch.manual_seed(0)
    model = MultiHeadNet()
    spg = SPG(model, heads=model.heads, backend=backend)
    tasks = make_tasks()
    spg.end_task(0, tasks[0])
    pointers, before = _pointers(spg), {n: k.clone() for n, k in spg.keep_factors.items()}
    scale = spg.head_scale.clone()
    spg.end_task(1, tasks[1])
    assert _pointers(spg) == pointers
    assert any(not torch.equal(k, before[n]) for n, k in spg.keep_factors.items()), (
        "task 1 changed nothing"
    )
    assert not torch.equal(spg.head_scale, scale)
    saved = {
        **spg.state_dict(),
        "keep": {n: torch.rand_like(k) for n, k in spg.keep_factors.items()},
    }
    spg.load_state_dict(saved)
    assert _pointers(spg) == pointers
    assert all(torch.equal(k, saved["keep"][n]) for n, k in spg.keep_factors.items())


def test_head_scale_has_the_importance_dtype():
    """float64 models keep their head scale in float64 (the authors' code does), others
    in float32."""
    for dtype in (torch.float32, torch.float64):
        torch.manual_seed(0)
        model = MultiHeadNet().to(dtype)
        spg = SPG(model, heads=model.heads, backend="torch")
        spg.end_task(0, [(x.to(dtype), y) for x, y in make_tasks()[0]])
        assert spg.head_scale.dtype == dtype
        flat = torch.cat([a.flatten().double() for a in spg.importance.values()])
        torch.testing.assert_close(
            spg.head_scale.double(),
            1 - flat.mean(),
            rtol=0,
            atol=2.0**-52 if dtype == torch.float64 else 2.0**-24,
        )
