"""A run stopped at a task boundary and resumed from checkpoints continues bit-identically."""

from __future__ import annotations

import io

import torch
import torch.nn.functional as F

from spg_fast import SPG
from tests.helpers import MultiHeadNet, make_tasks


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = MultiHeadNet(dropout=0.2)
    spg = SPG(model, heads=model.heads)
    opt = spg.wrap(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.7)
    return model, spg, opt, sched


def _run_tasks(model, spg, opt, sched, tasks, first: int) -> None:
    for task in range(first, len(tasks)):
        for _ in range(3):
            for x, y in tasks[task]:
                opt.zero_grad()
                F.cross_entropy(model(x, task), y).backward()
                opt.step()
                sched.step()
        spg.end_task(task, tasks[task])


def test_resume_at_a_task_boundary_is_bit_identical():
    tasks = make_tasks(n_tasks=3)
    uninterrupted = _setup()
    torch.manual_seed(123)
    _run_tasks(*uninterrupted, tasks, first=0)

    first = _setup()
    torch.manual_seed(123)
    _run_tasks(*first, tasks[:2], first=0)
    model, spg, opt, sched = first
    buffer = io.BytesIO()
    torch.save(
        {
            "model": model.state_dict(),
            "opt": opt.state_dict(),
            "sched": sched.state_dict(),
            "spg": spg.state_dict(),
            "rng": torch.get_rng_state(),
        },
        buffer,
    )
    del first, model, spg, opt, sched

    resumed = _setup(seed=99)  # different initial weights: everything must come from the checkpoint
    model, spg, opt, sched = resumed
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])
    spg.load_state_dict(ckpt["spg"])
    torch.set_rng_state(ckpt["rng"])
    _run_tasks(*resumed, tasks, first=2)

    for (name, a), b in zip(uninterrupted[0].named_parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b), name
    for name, a in uninterrupted[1].importance.items():
        assert torch.equal(a, spg.importance[name]), name
    assert spg.tasks_finished == 3
