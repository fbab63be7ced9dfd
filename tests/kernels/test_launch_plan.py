"""Launch plans: reused while the tensors stay put, rebuilt when any moves, and 16-byte vector
access only when every tensor the kernel touches is aligned (optimizer state included)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from spg_fast.kernels.triton.custom_ops import device_guard
from spg_fast.kernels.triton.multi_tensor import launch_plan, plan_for
from tests.kernels.common import DEVICE


def _tensors(n: int = 3) -> list[torch.Tensor]:
    return [torch.randn(1000 + i, device=DEVICE) for i in range(n)]


def test_a_plan_is_reused_until_a_pointer_or_size_changes():
    params, grads = _tensors(), _tensors()
    plan = launch_plan([params, grads], DEVICE)
    assert plan is not None and plan.aligned
    assert launch_plan([params, grads], DEVICE) is plan
    grads[1] = torch.randn(
        1001, device=DEVICE
    )  # a new gradient tensor, as after zero_grad(set_to_none=True)
    moved = launch_plan([params, grads], DEVICE)
    assert moved is not plan
    assert int(moved.pointers[1][1]) == grads[1].data_ptr()


def test_one_misaligned_state_tensor_turns_the_vector_path_off():
    params, grads = _tensors(), _tensors()
    flat = torch.zeros(sum(p.numel() for p in params) + 1, device=DEVICE)
    state, start = (
        [],
        1,
    )  # views of a flat checkpoint buffer, the first at a storage offset of one element
    for p in params:
        state.append(flat[start : start + p.numel()])
        start += p.numel()
    plan = launch_plan([params, grads, state], DEVICE)
    assert plan is not None and not plan.aligned


def test_tensors_in_another_layout_get_dense_copies():
    params = [torch.randn(7, 5, device=DEVICE)]
    grads = [torch.randn(5, 7, device=DEVICE).t()]  # same shape, transposed strides
    assert launch_plan([params, grads], DEVICE) is None
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
        launch_plan([params, [torch.zeros(5), torch.zeros(3, device="meta")]], torch.device("cpu"))
    with pytest.raises(
        TypeError,
        match="tensor 0 of list 0 is a _Sub, a tensor subclass the kernels cannot address",
    ):
        launch_plan([[params[0].as_subclass(_Sub)]], torch.device("cpu"))


def test_launches_run_on_the_tensors_device():
    """Triton launches on the current CUDA device; the launchers make the tensors'
    device current."""
    guard = device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(device_guard(torch.device("cpu")), contextlib.nullcontext)
