"""The DDP and FSDP2 examples run as a user runs them (slow): under ``torchrun`` with 2 gloo
processes on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spg_fast import SPG
from tests.integrations.examples import check_multihead_example, load, protected, ranks_of, torchrun

pytestmark = pytest.mark.slow


def test_ddp_example(tmp_path: Path) -> None:
    """Per-task heads under DDP (find_unused_parameters=True): every rank ends each task with the
    importance of one process over all the data, the replicas stay identical, and rank 0's
    checkpoint loads into a model that is not wrapped."""
    output = torchrun("ddp", "--out", tmp_path)
    assert "task 2: ended on 2 processes" in output
    example = load("ddp")
    ranks = ranks_of(tmp_path)
    check_multihead_example(ranks, example, batch=example.BATCH)
    assert protected(ranks) < 0.3
    plain = SPG(example.MultiHeadNet(), heads="heads")
    plain.load_state_dict(torch.load(tmp_path / "spg-task2.pt", weights_only=True))
    last = ranks[0][-1]["spg"]["keep"]
    assert plain.tasks_finished == 3 and all(
        torch.equal(plain.keep_factors[n], last[n]) for n in last
    )


def test_fsdp2_example_resumes_from_a_dcp_checkpoint_as_if_never_stopped(tmp_path: Path) -> None:
    """Stopped after task 0 and resumed from its DCP checkpoint (later heads untrained, so without
    a partial load DCP would refuse the optimizer state), the run ends every task with the
    importance of the run never stopped, bit for bit, on every rank."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    output = torchrun("fsdp2", "--out", straight)
    assert "task 2: ended on 2 processes" in output
    torchrun("fsdp2", "--out", split, "--stop-after", "0")
    output = torchrun("fsdp2", "--out", split, "--resume", split / "task0")
    assert "task 0:" not in output and "task 2: ended on 2 processes" in output
    states = [
        torch.load(folder / f"rank{r}.pt", weights_only=True)
        for folder in (straight, split)
        for r in range(2)
    ]
    first = states[0]
    assert first["tasks_finished"] == 3
    for other in states[1:]:
        assert other["tasks_finished"] == 3
        for name, k in first["keep"].items():
            assert torch.equal(other["keep"][name], k), name
