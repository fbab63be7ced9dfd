"""Ctrl-C and --resume: an interrupted run stops with one line and exit code 130, keeps a checkpoint
of every finished task, and resuming it gives exactly the metrics of an uninterrupted run
(bit-identical on the CPU)."""

from __future__ import annotations

import json
import shlex

import pytest

from spg_fast import cli
from spg_fast.harness import RunInterrupted, api, run
from spg_fast.harness.sequences import build_sequence

EXACT = (
    "acc_matrix",
    "acc",
    "bwt",
    "forgetting",
    "acc_weighted",
    "bwt_weighted",
    "forgetting_weighted",
    "epochs",
    "test_sizes",
    "tasks",
    "parameters",
)


def _ctrl_c_at(monkeypatch, call: int) -> list[int]:
    """Ctrl-C in the ``call``-th task trained (counting from 0 over all runs); returns the
    tasks trained."""
    real, trained = api.train_task, []

    def train(model, optimizer, task, *args, **kwargs):
        trained.append(task)
        if len(trained) - 1 == call:
            raise KeyboardInterrupt
        return real(model, optimizer, task, *args, **kwargs)

    monkeypatch.setattr(api, "train_task", train)
    return trained


@pytest.mark.parametrize("method", ["spg", "one"])
def test_resumed_run_equals_uninterrupted_run(method, tmp_path, monkeypatch, capsys):
    # dropout draws from the global RNG during training and SPG's importance pass; "one" builds a
    # network per task
    argv = [
        "run",
        "--method",
        method,
        "--max-epochs",
        "2",
        "--dropout-fc",
        "0.2",
        "--seed",
        "3",
        "--tasks",
        "3",
    ]
    assert cli.main([*argv, "--out", str(tmp_path / "whole")]) == 0
    cut = tmp_path / "cut"
    with monkeypatch.context() as m:
        _ctrl_c_at(m, 2)
        assert cli.main([*argv, "--out", str(cut)]) == 130
    last = capsys.readouterr().err.splitlines()[-1]
    message, command = last.split("; continue with: ")
    assert message == (
        f"spg-fast: interrupted {method} seed 3 on digits: tasks 0..1 of 3 saved in "
        f"{cut / 'checkpoint.pt'}"
    )
    assert not (cut / "results.json").exists() and (cut / "checkpoint.pt").exists()
    assert "interrupted: tasks 0..1 of 3 saved" in (cut / "log.txt").read_text()
    words = shlex.split(command)
    assert words[0] == "spg-fast" and words[-1] == "--resume"
    assert cli.main(words[1:]) == 0
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())
    resumed = json.loads((cut / "results.json").read_text())
    assert {k: resumed[k] for k in EXACT} == {k: whole[k] for k in EXACT}
    assert resumed["resumed_at_task"] == [2] and whole["resumed_at_task"] == []
    assert "resumed from" in (cut / "log.txt").read_text()
    # resuming a finished run trains nothing and returns its results
    assert (
        run(
            "digits",
            method,
            seed=3,
            out=cut,
            resume=True,
            config={"max_epochs": 2, "dropout_fc": 0.2},
            progress="none",
            tasks=3,
        )["acc_matrix"]
        == whole["acc_matrix"]
    )


def test_resume_refuses_a_different_run(tmp_path, monkeypatch, capsys):
    seq = build_sequence("digits", seed=0)
    seq.tasks = seq.tasks[:2]
    with monkeypatch.context() as m:
        _ctrl_c_at(m, 1)
        with pytest.raises(RunInterrupted, match=r"tasks 0\.\.0 of 2 saved"):
            run(seq, "spg", out=tmp_path, config={"max_epochs": 1}, progress="none")
    with pytest.raises(
        ValueError, match=r"--resume: .* holds a different run \(lr 0\.1 there, 0\.2 here\)"
    ):
        run(
            seq,
            "spg",
            out=tmp_path,
            config={"max_epochs": 1, "lr": 0.2},
            progress="none",
            resume=True,
        )
    with pytest.raises(ValueError, match="holds an earlier run"):
        run(seq, "spg", out=tmp_path, config={"max_epochs": 1})


def test_interrupted_compare_writes_partial_table_and_resumes_unfinished_runs(
    tmp_path, monkeypatch, capsys
):
    argv = [
        "compare",
        "--methods",
        "finetune,one",
        "--seeds",
        "0",
        "--max-epochs",
        "1",
        "--out",
        str(tmp_path),
    ]
    with monkeypatch.context() as m:
        _ctrl_c_at(m, 7)  # finetune's 5 tasks, then "one"'s tasks 0, 1 and the Ctrl-C in its task 2
        assert cli.main(argv) == 130
    assert (
        capsys.readouterr()
        .err.splitlines()[-1]
        .startswith(
            "spg-fast: interrupted one seed 0 on digits: tasks 0..1 of 5 saved in "
            f"{tmp_path / 'one-seed0'}"
        )
    )
    assert (tmp_path / "comparison.md").read_text().startswith("partial: 1 of 2 runs finished")
    assert json.loads((tmp_path / "comparison.json").read_text())["runs_finished"] == 1
    with monkeypatch.context() as m:
        trained = _ctrl_c_at(m, -1)
        assert cli.main([*argv, "--resume"]) == 0
    assert trained == [2, 3, 4]  # finetune skipped, "one" continued after its task 1
    assert "partial" not in (tmp_path / "comparison.md").read_text()
    summary = json.loads((tmp_path / "comparison.json").read_text())
    assert summary["runs_finished"] == summary["runs_planned"] == 2
