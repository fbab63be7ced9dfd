"""The command line and the Python API on the embedded digits (short settings), and their outputs."""

from __future__ import annotations

import csv
import json

import pytest

from spg_fast import cli
from spg_fast.harness import SEQUENCES, TrainConfig, compare, run

QUICK = ["--max-epochs", "3"]


def test_help_lists_every_option_and_sequence(capsys):
    for argv in ([], ["run"], ["compare"]):
        with pytest.raises(SystemExit):
            cli.main([*argv, "--help"])
        text = capsys.readouterr().out
        assert all(name in text for name in SEQUENCES), argv
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    text = capsys.readouterr().out
    for option in ("--sequence", "--method", "--backbone", "--seed", "--device", "--out", "--data-dir", "--lr",
                   "--max-epochs", "--batch-size", "--lr-patience"):
        assert option in text


def test_run_writes_results(tmp_path, capsys):
    assert cli.main(["run", *QUICK, "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr()
    assert "after \\ on" in printed.out and "spg on digits (seed 0)" in printed.out
    assert printed.err == ""  # no progress bar when the output is not a terminal
    result = json.loads((tmp_path / "results.json").read_text())
    for key in ("acc_matrix", "acc", "bwt", "forgetting", "acc_weighted", "bwt_weighted", "forgetting_weighted",
                "time_train_s", "time_importance_s", "config", "versions", "device"):
        assert key in result
    assert [len(row) for row in result["acc_matrix"]] == [1, 2, 3, 4, 5]
    assert result["config"]["max_epochs"] == 3 and result["config"]["method"] == "spg"
    assert all(t > 0 for t in result["time_importance_s"])
    rows = list(csv.reader((tmp_path / "acc_matrix.csv").open()))
    assert rows[0] == ["after_task", "task_0", "task_1", "task_2", "task_3", "task_4"] and len(rows) == 6
    assert (tmp_path / "acc_matrix.png").stat().st_size > 10_000


@pytest.mark.parametrize("argv, message", [
    (["run", "--method", "ewc"], "invalid choice: 'ewc'"),
    (["run", "--sequence", "mnist"], "invalid choice: 'mnist'"),
])
def test_bad_names_list_the_valid_ones(argv, message, capsys):
    with pytest.raises(SystemExit):
        cli.main(argv)
    err = capsys.readouterr().err
    assert message in err and "choose from" in err


def test_compare_rejects_unknown_methods(capsys):
    assert cli.main(["compare", "--methods", "spg,ewc", *QUICK]) == 2
    assert "unknown method(s) ewc; valid: spg, finetune, one" in capsys.readouterr().err


def test_missing_data_is_a_clear_cli_error(tmp_path, capsys):
    assert cli.main(["run", "--sequence", "cifar100-10", "--data-dir", str(tmp_path), *QUICK]) == 2
    assert f"CIFAR-100 not found: looked for cifar-100-python/train in {tmp_path}" in capsys.readouterr().err


def test_compare_writes_a_side_by_side_table(tmp_path):
    out = compare("digits", ("spg", "one"), (0, 1), out=tmp_path, config=TrainConfig(max_epochs=2))
    assert [row["method"] for row in out["summary"]] == ["spg", "one"]
    assert out["summary"][0]["seeds"] == [0, 1]
    for name in ("comparison.json", "comparison.csv", "comparison.md", "comparison.png"):
        assert (tmp_path / name).exists()
    assert (tmp_path / "spg-seed1" / "results.json").exists()
    assert "| spg | 2 |" in (tmp_path / "comparison.md").read_text()


def test_runs_are_reproducible():
    a = run("digits", "spg", seed=5, config=TrainConfig(max_epochs=2))
    b = run("digits", "spg", seed=5, config=TrainConfig(max_epochs=2))
    assert a["acc_matrix"] == b["acc_matrix"]


def test_spg_removes_most_of_finetunings_forgetting():
    """On the embedded default with its default protocol and 3 seeds (numbers in the README)."""
    out = compare("digits", ("spg", "finetune"), (0, 1, 2))
    spg, finetune = (row["forgetting"]["mean"] for row in out["summary"])
    acc_spg, acc_finetune = (row["acc"]["mean"] for row in out["summary"])
    assert finetune > 0.05, "fine-tuning should forget clearly on this sequence"
    assert spg < finetune / 3, (spg, finetune)
    assert acc_spg > acc_finetune
