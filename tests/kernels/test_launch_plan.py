"""Launch plans: owned by their caller, built once, re-pointed in place when one list's tensors move
(the gradients after zero_grad(set_to_none=True)), refused for tensors they cannot address, and
16-byte vector access only when every tensor the kernel touches is aligned (optimizer state
included)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from spg_fast.kernels.triton.custom_ops import device_guard
from spg_fast.kernels.triton.multi_tensor import LaunchPlan, plan_for
from tests.kernels.common import DEVICE


def _tensors(n: int = 3) -> list[torch.Tensor]:
    return [torch.randn(1000 + i, device=DEVICE) for i in range(n)]


def test_refresh_rewrites_one_table_in_place_only_when_a_pointer_moved():
    params, grads = _tensors(), _tensors()
    plan = LaunchPlan([params, grads], DEVICE)
    assert plan.aligned
    table = plan.pointers[1]
    address, before = table.data_ptr(), table.clone()
    assert plan.refresh(1, grads) and torch.equal(table, before)  # nothing moved
    moved = [*grads[:1], torch.randn(1001, device=DEVICE), grads[2]]  # as after zero_grad
    assert plan.refresh(1, moved)
    assert plan.pointers[1].data_ptr() == address  # rewritten in place
    assert [int(v) for v in plan.pointers[1]] == [t.data_ptr() for t in moved]
    assert torch.equal(plan.pointers[0].cpu(), torch.tensor([p.data_ptr() for p in params]))


def test_refresh_refuses_tensors_in_another_layout_and_changes_nothing():
    params = [torch.randn(7, 5, device=DEVICE)]
    plan = LaunchPlan([params, params], DEVICE)
    before = plan.pointers[1].clone()
    transposed = [torch.randn(5, 7, device=DEVICE).t()]  # same shape, other strides
    assert not plan.refresh(1, transposed)
    assert torch.equal(plan.pointers[1], before)


def test_one_misaligned_state_tensor_turns_the_vector_path_off():
    params, grads = _tensors(), _tensors()
    flat = torch.zeros(sum(p.numel() for p in params) + 1, device=DEVICE)
    # Views of a flat checkpoint buffer, the first at a storage offset of one element.
    state, start = [], 1
    for p in params:
        state.append(flat[start : start + p.numel()])
        start += p.numel()
    assert not LaunchPlan([params, grads, state], DEVICE).aligned
    plan = LaunchPlan([params, grads], DEVICE)
    assert plan.aligned
    assert plan.refresh(1, state) and not plan.aligned  # a refreshed list counts too


def test_tensors_in_another_layout_get_dense_copies():
    params = [torch.randn(7, 5, device=DEVICE)]
    grads = [torch.randn(5, 7, device=DEVICE).t()]  # same shape, transposed strides
    assert not LaunchPlan.fits([params, grads])
    plan, (work_p, work_g) = plan_for([params, grads], DEVICE)
    assert work_p[0] is params[0] and work_g[0] is not grads[0]
    assert torch.equal(work_g[0], grads[0]) and work_g[0].stride() == params[0].stride()
    assert plan.grid == (1,)


class _Sub(torch.Tensor):
    """A tensor subclass, as FSDP2's DTensor is one: its data pointer is not its
    elements' memory."""


def test_a_tensor_elsewhere_or_a_subclass_is_refused_before_any_launch():
    params = [torch.zeros(5), torch.zeros(3)]
    with pytest.raises(
        ValueError, match=r"tensor 1 of list 1 \(shape \(3,\)\) is on meta, the launch on cpu"
    ):
        LaunchPlan([params, [torch.zeros(5), torch.zeros(3, device="meta")]], torch.device("cpu"))
    with pytest.raises(
        TypeError,
        match="tensor 0 of list 0 is a _Sub, a tensor subclass the kernels cannot address",
    ):
        LaunchPlan([[params[0].as_subclass(_Sub)]], torch.device("cpu"))


def test_launches_run_on_the_tensors_device():
    """Triton launches on the current CUDA device; the launchers make the tensors'
    device current."""
    guard = device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(device_guard(torch.device("cpu")), contextlib.nullcontext)
