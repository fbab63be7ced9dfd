"""A run that stops learning says so: a non-finite training loss or weight stops it with a one-line
error naming the task and epoch (exit code 1), a task at chance after an exploding loss is flagged,
and either way results.json says ``diverged`` and why; a comparison counts diverged runs."""

from __future__ import annotations

import json
import math

import torch

from spg_fast import cli
from spg_fast.harness import compare, health, report
from spg_fast.harness.parallel import Ranks


def _diverged_run(argv, out, capsys) -> tuple[dict, list[str], str]:
    assert cli.main([*argv, "--out", str(out)]) == 1
    printed = capsys.readouterr()
    return json.loads((out / "results.json").read_text()), printed.err.splitlines(), printed.out


def test_a_non_finite_loss_stops_the_run(tmp_path, capsys):
    """lr 1000: the loss is ~5e25 after the first epoch and NaN in the second."""
    argv = ["run", "--method", "finetune", "--lr", "1000", "--tasks", "2"]
    result, err, out = _diverged_run(argv, tmp_path, capsys)
    assert result["diverged"] is True
    assert result["divergence"] == {
        "task": 0,
        "epoch": 2,
        "why": "non-finite training loss (nan)",
    }
    assert result["acc_matrix"] == [] and result["acc"] is None  # no task finished
    assert err[-1] == (
        "spg-fast: error: finetune seed 0 on digits diverged in task 0 epoch 2: non-finite "
        "training loss (nan)"
    )
    assert "DIVERGED: diverged in task 0 epoch 2" in out
    log = (tmp_path / "log.txt").read_text()
    assert "diverged in task 0 epoch 2: non-finite training loss (nan); run stopped" in log
    # the epoch that diverged is in the log, not in the metrics files
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_a_task_at_chance_after_an_exploding_loss_is_flagged(tmp_path, capsys):
    """lr 5: task 0's training loss reaches ~2e4 (a uniform guess: ln 2) and its weights end at
    chance; the run goes on."""
    argv = ["run", "--method", "finetune", "--lr", "5", "--tasks", "2"]
    result, err, _ = _diverged_run(argv, tmp_path, capsys)
    assert len(result["acc_matrix"]) == 2 and result["acc"] is not None
    d = result["divergence"]
    assert (d["task"], d["epoch"]) == (0, None)
    assert d["why"].startswith("accuracy 0.500 at chance (0.500) after the training loss reached")
    assert err[-1].startswith("spg-fast: error: finetune seed 0 on digits diverged in task 0: ")


def test_exploded_rule():
    assert health.exploded(0.5, 2, [0.7, 7.0]) is not None  # 7 > 10 ln 2
    assert health.exploded(0.5, 2, [0.7, 6.9]) is None  # the loss did not explode
    assert health.exploded(0.6, 2, [0.7, 100.0]) is None  # above chance + 10% of the way to 1
    assert health.exploded(0.19, 10, [100.0]) is not None and 10 * math.log(10) < 100


def test_non_finite_weights_stop_training():
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[1, 0] = float("inf")
    try:
        health.check_epoch(model, 3, 7, 0.5, Ranks())
    except health.DivergedError as e:
        assert str(e) == "task 3 epoch 7: non-finite weights in weight"
    else:
        raise AssertionError("no DivergedError")


def test_a_comparison_counts_diverged_runs(tmp_path):
    out = compare(
        "digits",
        ("finetune",),
        (0, 1),
        out=tmp_path,
        config={"lr": 1000.0},
        tasks=1,
        progress="none",
    )
    (row,) = out["summary"]
    assert row["diverged"] == 2 and all(r["diverged"] for r in out["runs"])
    finished = [r["acc"] for r in out["runs"] if r["acc"] is not None]  # runs with a task done
    assert row["acc"]["mean"] == (sum(finished) / len(finished) if finished else None)
    assert report.comparison_table(out["summary"]).splitlines()[-1].endswith("| 2 |")
    assert (tmp_path / "comparison.png").stat().st_size > 10_000
