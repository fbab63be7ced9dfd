"""The host path of ``spg_fast.optim`` in the loop people write (``zero_grad()``, backward,
``step()``): each param group's plan is built once and reused while the gradients are replaced
every step, wherever the allocator puts the new gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spg_fast import SPG, optim
from tests.helpers import MultiHeadNet, make_tasks
from tests.test_optim import PATHS


@pytest.fixture(params=list(PATHS))
def backend(request, monkeypatch):
    name, native = PATHS[request.param]
    monkeypatch.setenv("SPG_FAST_NATIVE", native)
    return name


def _loop(model, opt, batches, steps, hold=None):
    for i in range(steps):
        x, y = batches[i % len(batches)]
        opt.zero_grad()  # set_to_none: every step gets new gradient tensors
        F.cross_entropy(model(x, 1), y).backward()
        if hold is not None:  # keep them alive: the next step's cannot reuse their memory
            hold.append([p.grad for p in model.parameters()])
        opt.step()


@pytest.mark.parametrize("mask", ["gradient", "update"])
def test_a_real_loop_builds_each_plan_once_wherever_the_gradients_land(backend, mask):
    torch.manual_seed(0)
    model = MultiHeadNet()
    spg = SPG(model, heads=model.heads, backend=backend)
    tasks = make_tasks()
    spg.end_task(0, tasks[0])
    twin = copy.deepcopy(model)
    twin_spg = SPG(twin, heads=twin.heads, backend=backend)
    twin_spg.load_state_dict(spg.state_dict())
    opt = optim.AdamW(model.parameters(), lr=1e-2, spg=spg, mask=mask)
    twin_opt = optim.AdamW(twin.parameters(), lr=1e-2, spg=twin_spg, mask=mask)
    _loop(model, opt, tasks[1], 4)
    held: list = []
    _loop(twin, twin_opt, tasks[1], 4, hold=held)
    pointers = {g.data_ptr() for step in held for g in step if g is not None}
    assert len(pointers) > len(held[0])  # the held run's gradients did land elsewhere
    assert opt.plan_builds == twin_opt.plan_builds == 1  # one group, planned once
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_plan_is_rebuilt_when_the_mask_or_the_parameters_change():
    torch.manual_seed(0)
    model = MultiHeadNet(n_tasks=2)
    spg = SPG(model, heads=model.heads, backend="torch")
    tasks = make_tasks()
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9, spg=spg)
    _loop(model, opt, tasks[1], 2)
    assert opt.plan_builds == 1
    spg.end_task(0, tasks[0])  # the mask exists now
    _loop(model, opt, tasks[1], 2)
    assert opt.plan_builds == 2
    model.heads.append(nn.Linear(12, 3))  # a new head: SPG's mask generation moves on
    opt.add_param_group({"params": model.heads[2].parameters()})
    _loop(model, opt, tasks[1], 2)  # the new group has no gradient yet: no plan of its own
    assert opt.plan_builds == 3
    opt.load_state_dict(opt.state_dict())  # the plans are dropped
    _loop(model, opt, tasks[1], 1)
    assert opt.plan_builds == 4
