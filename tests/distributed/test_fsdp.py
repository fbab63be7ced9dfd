"""SPG under FSDP2 (``fully_shard``): 2 gloo processes on CPU against one process over all the data.

The ranks run once for the module (``fsdp_workers.fsdp_scenarios``); each test checks one property
of what they measured.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

from spg_fast import SPG
from spg_fast.checkpoint import SPGState
from tests.distributed.fsdp_workers import (
    FUSED_CASES,
    N_TASKS,
    NARROW,
    SPLITS,
    ShardNet,
    fsdp_scenarios,
)
from tests.distributed.workers import WORLD, launch

# Spawning two processes and importing torch in them takes most of this; a hang fails at
# the timeout.
TIMEOUT_S = 120

IMPORTANCE_CASES = [f"importance/{split}" for split in SPLITS]

pytestmark = pytest.mark.slow  # two spawned processes


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(tmp_path_factory.mktemp("fsdp"))


@pytest.fixture(scope="module")
def ranks(folder: Path) -> list[dict[str, Any]]:
    return launch(folder, TIMEOUT_S, fsdp_scenarios)


@pytest.mark.parametrize("case", IMPORTANCE_CASES)
def test_importance_matches_one_process_over_all_data(
    ranks: list[dict[str, Any]], case: str
) -> None:
    for result in ranks:
        diffs = result[case]["diff"]
        assert len(diffs) == N_TASKS
        assert max(diffs) < 1e-6, diffs


@pytest.mark.parametrize("case", IMPORTANCE_CASES)
def test_every_rank_gets_identical_importance_and_head_scale(
    ranks: list[dict[str, Any]], case: str
) -> None:
    first = ranks[0][case]
    for other in ranks[1:]:
        for a, b in zip(first["importance"], other[case]["importance"], strict=True):
            assert a.keys() == b.keys()
            assert all(torch.equal(a[n], b[n]) for n in a)
        assert first["head_scale"] == other[case]["head_scale"]
    for mine, single in first["head_scale"]:
        assert abs(mine - single) < 1e-6


def test_shards_are_uneven_and_one_is_empty(ranks: list[dict[str, Any]]) -> None:
    shapes = [r["importance/equal"]["local_shapes"] for r in ranks]
    assert [s["trunk.0.weight"] for s in shapes] == [(17, 8), (16, 8)]
    assert [s["gate"] for s in shapes] == [(1, 6), (0, 6)]


@pytest.mark.parametrize("case", IMPORTANCE_CASES)
def test_masked_training_matches_one_process(ranks: list[dict[str, Any]], case: str) -> None:
    for result in ranks:
        assert result[case]["param_diff"] < 1e-6
        assert "FSDP2" in result[case]["reason"]


@pytest.mark.parametrize("kind", ["nan_grad", "nan_loss", "empty"])
def test_failure_on_one_rank_raises_everywhere_and_changes_nothing(
    ranks: list[dict[str, Any]], kind: str
) -> None:
    errors = [r[f"failure/{kind}"]["error"] for r in ranks]
    assert all(e is not None for e in errors), errors
    expected = {
        "nan_grad": "FloatingPointError",
        "nan_loss": "FloatingPointError",
        "empty": "ValueError",
    }[kind]
    assert {e[0] for e in errors} == {expected}
    words = {
        "nan_grad": "non-finite gradient",
        "nan_loss": "loss is non-finite",
        "empty": "no batches",
    }[kind]
    assert all(words in e[1] and "SPG.end_task(1)" in e[1] for e in errors), errors
    assert all(r[f"failure/{kind}"]["unchanged"] for r in ranks)
    assert all(r["in_step"] for r in ranks)


@pytest.mark.parametrize(
    "kind", ["nan_grad", "nan_loss", "empty", "bad_checkpoint", "shared_forward"]
)
def test_after_a_failure_the_task_ends_on_clean_data_as_one_process_ends_it(
    ranks: list[dict[str, Any]], kind: str
) -> None:
    """A pass stopped between forward and backward (a non-finite loss) left FSDP2's root
    parameters gathered, and the next end_task refused the model ("shared parameters changed")."""
    for r in ranks:
        recovered = r[f"failure/{kind}"]["recovered"]
        assert isinstance(recovered, float) and recovered < 1e-6, recovered


def test_nan_gradient_names_the_parameters(ranks: list[dict[str, Any]]) -> None:
    for r in ranks:
        message = r["failure/nan_grad"]["error"][1]
        assert "trunk.0.weight" in message and "every rank" in message


def test_bad_checkpoint_on_one_rank_is_refused_everywhere(ranks: list[dict[str, Any]]) -> None:
    errors = [r["failure/bad_checkpoint"]["error"] for r in ranks]
    assert errors[1] is not None and "[0, 1]" in errors[1][1] and "trunk.0.weight" in errors[1][1]
    assert errors[0] is not None and "other rank" in errors[0][1]
    assert all(r["failure/bad_checkpoint"]["unchanged"] for r in ranks)


def test_shared_forward_is_refused(ranks: list[dict[str, Any]]) -> None:
    for r in ranks:
        error = r["failure/shared_forward"]["error"]
        assert error is not None and error[0] == "ValueError" and "FSDP2" in error[1]
        assert r["failure/shared_forward"]["unchanged"]


@pytest.mark.parametrize(
    "check",
    [
        "grads_kept",
        "plain_equal",
        "back_equal",
        "back_head_scale",
        "dcp_equal",
        "dcp_head_scale",
        "dcp_before_first_task",
    ],
)
def test_checkpoints(ranks: list[dict[str, Any]], check: str) -> None:
    assert all(r["checkpoint"][check] for r in ranks)


def test_update_masking_matches_one_process(ranks: list[dict[str, Any]]) -> None:
    for r in ranks:
        assert r["checkpoint"]["update_masked_diff"] < 1e-6


@pytest.mark.parametrize("case", [f"{name}/{backend}" for name, backend in FUSED_CASES])
def test_fused_optimizers_step_the_shards_as_one_process_steps_everything(
    ranks: list[dict[str, Any]], case: str
) -> None:
    for r in ranks:
        assert r["fused"][case] < 1e-6
        assert set(r["fused"][f"{case}/state"]) == {
            "DTensor"
        }  # the state is sharded like the parameters


# DCP warns that it loads in a single process, which is the point here.
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_checkpoint_of_two_ranks_loads_into_one_plain_process(
    ranks: list[dict[str, Any]], folder: Path
) -> None:
    """DCP reshards: the shards two ranks saved load as full tensors into a model that is
    not sharded."""
    spg = SPG(ShardNet(), heads="heads", backend="torch")
    dcp.load({"spg": SPGState(spg)}, checkpoint_id=str(folder / "dcp"), no_dist=True)
    want = ranks[0]["checkpoint"]["full_importance"]  # the stored keep factors
    assert spg.tasks_finished == 1 and spg.keep_factors.keys() == want.keys()
    assert all(torch.equal(spg.keep_factors[n], want[n]) for n in want)


# Two processes sum in another order than one, so a float32 keep factor may differ in its last bit
# and round the other way: one bfloat16 ulp below 1 (2**-9) or one uint8 code.
NARROW_GAP = {"bfloat16": 2.0**-9, "uint8": 1}


@pytest.mark.parametrize("name", NARROW)
def test_narrow_storage_without_heads_shards_checkpoints_and_steps(
    ranks: list[dict[str, Any]], name: str
) -> None:
    for r in ranks:
        result = r[f"narrow/{name}"]
        assert result["dtypes"] == [f"torch.{name}"]
        assert result["gap"] <= NARROW_GAP[name]
        assert abs(result["head_scale"][0] - result["head_scale"][1]) < 1e-6
        assert result["dcp_equal"]
        assert result["moved"] and result["fused_diff"] < 1e-6


def test_hsdp_is_refused_clearly(ranks: list[dict[str, Any]]) -> None:
    for r in ranks:
        assert r["hsdp"] is not None and "HSDP" in r["hsdp"]
    assert len(ranks) == WORLD
