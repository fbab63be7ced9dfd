"""``SPG.usage()``: the importance's claim on the network, against a literal count."""

from __future__ import annotations

import torch

from spg_fast import SPG
from tests.helpers import MultiHeadNet, make_tasks


def test_usage_before_the_first_task_is_empty_with_head_scale_one() -> None:
    model = MultiHeadNet()
    u = SPG(model, heads=model.heads).usage()
    assert (u.tasks_finished, u.mean, u.above_0_5, u.above_0_9, u.head_scale) == (0, 0, 0, 0, 1)
    assert u.numel == sum(p.numel() for p in model.trunk.parameters())
    assert set(u.parameters) == {n for n, _ in model.named_parameters() if n.startswith("trunk")}


def test_usage_counts_every_element_once() -> None:
    torch.manual_seed(0)
    model = MultiHeadNet()
    spg = SPG(model, heads=model.heads)
    tasks = make_tasks()
    spg.end_task(0, tasks[0])
    spg.end_task(1, tasks[1])
    u = spg.usage()
    flat = torch.cat([a.flatten().double() for a in spg.importance.values()])
    assert u.tasks_finished == 2 and u.numel == flat.numel()
    assert u.mean == float(flat.mean())
    assert u.above_0_5 == float((flat > 0.5).double().mean())
    assert u.above_0_9 == float((flat > 0.9).double().mean())
    assert abs(u.head_scale - float(spg.head_scale)) < 1e-7
    for name, a in spg.importance.items():
        part = u.parameters[name]
        assert part.numel == a.numel() and part.mean == float(a.double().mean())
        assert part.above_0_9 == float((a > 0.9).double().mean())
    as_dict = u.as_dict()
    assert {"mean", "above_0.5", "above_0.9", "head_scale"} <= set(as_dict)
