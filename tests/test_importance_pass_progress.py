"""The pass's progress hook: one ``PassProgress`` after every batch of every pass over the data,
and nothing at all without a hook."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from spg_fast import _importance_pass
from spg_fast._importance_pass import ImportancePass, PassProgress
from tests.helpers import MultiHeadNet, make_tasks
from tests.test_importance_engine import FunctionalDropoutNet, PoisonNet


def _setup(n_tasks: int = 3, n_batches: int = 4):
    torch.manual_seed(0)
    model = MultiHeadNet(n_tasks=n_tasks).double()
    batches = [(x.double(), y) for x, y in make_tasks(n_tasks=1, n_batches=n_batches)[0]]
    return model, batches


def _engine(model, loader, k: int, **options) -> ImportancePass:
    return ImportancePass(
        model,
        list(model.trunk.parameters()),
        model.heads.parameters(),
        list(range(k + 1)),
        loader,
        model,
        lambda head: F.cross_entropy if head == k else (lambda out, _y: out.sum()),
        lambda batch: batch,
        **options,
    )


def _seen(model, loader, k: int, **options) -> list[tuple]:
    seen: list[PassProgress] = []
    for _ in _engine(model, loader, k, progress=seen.append, **options).run():
        pass
    return [dataclasses.astuple(p) for p in seen]


def test_per_head_passes_report_every_batch_of_every_head():
    model, batches = _setup()
    got = _seen(model, batches, 2, shared_forward=False)
    # (head, heads_done, heads, batch, batches, passes): a head is done after its last batch.
    want = [
        (head, head + (batch == 4), 3, batch, 4, head + 1)
        for head in range(3)
        for batch in range(1, 5)
    ]
    assert got == want


def test_groups_report_their_last_head():
    model, batches = _setup()
    per_head = sum(p.numel() * p.element_size() for p in model.trunk.parameters())
    got = _seen(model, batches, 2, memory_budget=2 * per_head)
    want = [(1, 2 if b == 4 else 0, 3, b, 4, 1) for b in range(1, 5)]
    want += [(2, 3 if b == 4 else 2, 3, b, 4, 2) for b in range(1, 5)]
    assert got == want


class Unsized:
    """A re-iterable loader without a length."""

    def __init__(self, batches: list) -> None:
        self._batches = batches

    def __iter__(self):
        return iter(self._batches)


def test_a_loader_without_length_reports_none():
    model, batches = _setup(n_tasks=1, n_batches=3)
    got = _seen(model, Unsized(batches), 0)
    assert got == [(0, 0, 1, 1, None, 1), (0, 0, 1, 2, None, 1), (0, 1, 1, 3, None, 1)]


def test_the_repeat_that_traces_a_non_finite_gradient_is_a_pass_too():
    torch.manual_seed(0)
    model = PoisonNet(n_tasks=2).double()
    batches = [(x.double(), y) for x, y in make_tasks(n_tasks=1, n_batches=3)[0]]
    batches[1][0][0, 0] = 1e4
    got = _seen(model, batches, 1, shared_forward=True)
    assert got == [(1, 0, 2, 1, 3, 1), (1, 0, 2, 2, 3, 1), (1, 2, 2, 3, 3, 1)] + [
        (1, 2, 2, b, 3, 2) for b in (1, 2, 3)
    ]


def test_random_draws_shrink_the_group_to_its_first_head():
    _, batches = _setup(n_batches=2)
    model = FunctionalDropoutNet(n_tasks=3).double()
    got = _seen(model, batches, 1)
    # Each head's own pass; the probe's group [0, 1] became [0] before its first batch ended.
    assert got == [(0, 0, 2, 1, 2, 1), (0, 1, 2, 2, 2, 1), (1, 1, 2, 1, 2, 2), (1, 2, 2, 2, 2, 2)]


def test_progress_is_frozen_and_costs_nothing_without_a_hook(monkeypatch):
    with pytest.raises(dataclasses.FrozenInstanceError):
        PassProgress(0, 0, 1, 1, None, 1).batch = 2

    def never(*args, **kwargs):
        raise AssertionError("PassProgress built without a progress hook")

    monkeypatch.setattr(_importance_pass, "PassProgress", never)
    model, batches = _setup()
    assert len(list(_engine(model, batches, 2).run())) == 3
