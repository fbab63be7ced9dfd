"""``SPG.end_task`` on a model written the authors' way (functional calls between its layers):
the head capture shares the forward, and the importance is the per-head passes' exactly."""

from __future__ import annotations

import copy

import torch

from spg_fast import SPG
from tests.test_importance_pass_capture import FlatNet, _batches


def test_end_task_on_a_flat_model_captures_the_heads_input_and_matches_the_per_head_passes():
    torch.manual_seed(0)
    model = FlatNet().double()
    twin = copy.deepcopy(model)
    shared, per_head = SPG(model, heads=model.heads), SPG(twin, heads=twin.heads)
    batches = _batches()
    for task in range(3):
        report = shared.end_task(task, batches)
        reference = per_head.end_task(task, batches, shared_forward=False)
        assert reference.strategy == "per-head forwards"
        if task:
            assert report.strategy == "head capture" and report.fallback == ""
            assert report.captured == task * (len(batches) - 1)
    got, want = shared.importance, per_head.importance
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in got)
