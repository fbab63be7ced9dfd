"""SPG under DistributedDataParallel: 2 gloo processes on CPU against one process over all the data.

The ranks run once for the module (``workers.ddp_scenarios``); each test checks one property of what
they measured.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.distributed.workers import N_TASKS, SPLITS, launch

# Spawning two processes and importing torch in them takes most of this; a hang fails at
# the timeout.
TIMEOUT_S = 90

pytestmark = pytest.mark.slow  # two spawned processes

DDP_CASES = [f"ddp/{find_unused}/{split}" for find_unused in (False, True) for split in SPLITS]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return launch(Path(tmp_path_factory.mktemp("ddp")), TIMEOUT_S)


@pytest.mark.parametrize("case", DDP_CASES)
def test_importance_matches_one_process_over_all_data(
    ranks: list[dict[str, Any]], case: str
) -> None:
    for result in ranks:
        diffs = result[case]["diff"]
        assert len(diffs) == N_TASKS
        assert max(diffs) <= 1e-6, diffs


@pytest.mark.parametrize("case", DDP_CASES)
def test_every_rank_gets_identical_importance(ranks: list[dict[str, Any]], case: str) -> None:
    first = ranks[0][case]["importance"]
    assert all(bool(a.gt(0).any()) for a in first[-1].values())
    for other in ranks[1:]:
        for task in range(N_TASKS):
            for name, a in first[task].items():
                assert torch.equal(a, other[case]["importance"][task][name]), (task, name)


@pytest.mark.parametrize("case", DDP_CASES)
def test_training_after_end_task_stays_in_sync(ranks: list[dict[str, Any]], case: str) -> None:
    for name, p in ranks[0][case]["params"].items():
        assert torch.equal(p, ranks[1][case]["params"][name]), name


@pytest.mark.parametrize("case", DDP_CASES)
def test_checkpoints_cross_between_ddp_and_plain(ranks: list[dict[str, Any]], case: str) -> None:
    result = ranks[0][case]
    assert result["keys"] == ["trunk.0.bias", "trunk.0.weight", "trunk.3.bias", "trunk.3.weight"]
    # Each task's single process loaded the DDP SPG's checkpoint; a DDP SPG loaded the single
    # process's back.
    assert result["loaded_back"] == [True] * N_TASKS


def test_nonfinite_gradient_on_one_rank_raises_everywhere(ranks: list[dict[str, Any]]) -> None:
    for result in ranks:
        failure = result["failure/nan_grad"]
        assert failure["unchanged"]
        kind, message = failure["error"]
        assert kind == "FloatingPointError"
        assert "non-finite gradient" in message and "rank(s) [1]" in message and "head 0" in message


@pytest.mark.parametrize(
    ("case", "own_error"),
    [
        ("nan_loss", ("FloatingPointError", "loss is non-finite")),
        ("empty", ("ValueError", "yielded no batches")),
    ],
)
def test_failure_on_one_rank_raises_on_the_others(
    ranks: list[dict[str, Any]], case: str, own_error: tuple[str, str]
) -> None:
    failing = ranks[1][f"failure/{case}"]
    assert failing["unchanged"] and failing["error"][0] == own_error[0]
    assert own_error[1] in failing["error"][1]
    for result in ranks[:1]:
        assert result[f"failure/{case}"]["unchanged"]
        kind, message = result[f"failure/{case}"]["error"]
        assert kind == "RuntimeError" and "failed on rank(s) [1]" in message
    assert all(result["in_step"] for result in ranks)


def test_forward_through_the_ddp_wrapper_is_refused_on_every_rank(
    ranks: list[dict[str, Any]],
) -> None:
    for result in ranks:
        failure = result["failure/ddp_forward"]
        assert failure["unchanged"]
        kind, message = failure["error"]
        assert kind == "RuntimeError" and "called the DistributedDataParallel wrapper" in message
