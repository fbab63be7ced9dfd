"""Ctrl-C and --resume: an interrupted run stops with one line and exit code 130, keeps a checkpoint
from its start and of every finished task, and resuming it gives exactly the metrics of an
uninterrupted run (bit-identical on the CPU). --resume takes the settings from the output folder
(an option given again must agree), and refuses a missing or empty folder, a damaged checkpoint
and one with non-finite weights, each with a one-line error."""

from __future__ import annotations

import json
import shlex

import pytest

from spg_fast import cli
from spg_fast.harness import RunInterrupted, api, outputs, run
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


def _one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The CLI's stderr for ``argv``, which must fail with exit code 2 and exactly one line."""
    with pytest.raises(SystemExit) as stopped:
        raise SystemExit(cli.main(argv))
    assert stopped.value.code == 2, argv
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("spg-fast: error: "), err
    return err.strip().removeprefix("spg-fast: error: ")


def test_resume_needs_a_run_in_out(tmp_path, capsys):
    assert _one_line_error(["run", "--resume"], capsys) == (
        "--resume: give --out, the folder of the run to continue"
    )
    missing = tmp_path / "missing"
    for command in ("run", "compare"):
        assert _one_line_error([command, "--resume", "--out", str(missing)], capsys) == (
            f"--resume: {missing} does not exist: there is no run to continue"
        )
    assert _one_line_error(["run", "--resume", "--out", str(tmp_path)], capsys) == (
        f"--resume: {tmp_path} holds no run to continue (no checkpoint.pt or results.json); "
        "start it without --resume"
    )
    assert "holds no run to continue (no settings.json)" in _one_line_error(
        ["compare", "--resume", "--out", str(tmp_path)], capsys
    )
    assert not missing.exists()


def _interrupted_run(out, argv, monkeypatch, capsys, call: int = 1) -> None:
    with monkeypatch.context() as m:
        _ctrl_c_at(m, call)
        assert cli.main([*argv, "--out", str(out)]) == 130
    capsys.readouterr()


def test_resume_takes_the_settings_from_the_checkpoint(tmp_path, monkeypatch, capsys):
    argv = ["run", "--method", "one", "--seed", "3", "--tasks", "3", "--lr", "0.05"]
    cut = tmp_path / "cut"
    _interrupted_run(cut, [*argv, "--max-epochs", "2"], monkeypatch, capsys)
    resume = ["run", "--out", str(cut), "--resume"]
    for given, message in (
        (["--lr", "0.1"], f"--lr: 0.1 contradicts the run in {cut} (0.05 there)"),
        (["--method", "spg"], f"--method: spg contradicts the run in {cut} (one there)"),
        (["--tasks", "5"], f"--tasks: 5 contradicts the run in {cut} (3 there)"),
        (["--sequence", "digits-permuted"], "--sequence: digits-permuted contradicts the run"),
        (["--hat-c", "1"], f"--hat-c: does not apply to the run in {cut}"),
    ):
        assert _one_line_error([*resume, *given], capsys).startswith(message), given
    capsys.readouterr()
    assert cli.main([*resume, "--lr", "0.05", "--seed", "3"]) == 0  # agreeing options are fine
    result = json.loads((cut / "results.json").read_text())
    assert (result["method"], result["config"]["seed"], result["config"]["lr"]) == ("one", 3, 0.05)
    assert len(result["acc_matrix"]) == 3 and result["resumed_at_task"] == [1]
    assert (
        result["config"]["max_epochs"] == 2 and "max_epochs" not in result["config"]["from_preset"]
    )
    assert cli.main(resume) == 0  # a finished run: its results, nothing trained


def test_compare_resume_takes_its_settings(tmp_path, monkeypatch, capsys):
    argv = ["compare", "--methods", "finetune,one", "--seeds", "4", "--tasks", "2"]
    _interrupted_run(tmp_path, [*argv, "--max-epochs", "1"], monkeypatch, capsys, call=3)
    resume = ["compare", "--out", str(tmp_path), "--resume"]
    assert _one_line_error([*resume, "--seeds", "0"], capsys).startswith(
        f"--seeds: 0 contradicts the run in {tmp_path} (4 there)"
    )
    assert _one_line_error([*resume, "--max-epochs", "3"], capsys).startswith(
        f"--max-epochs: 3 contradicts the run in {tmp_path} (1 there)"
    )
    with monkeypatch.context() as m:
        trained = _ctrl_c_at(m, -1)
        assert cli.main(resume) == 0
    assert trained == [1]
    summary = json.loads((tmp_path / "comparison.json").read_text())
    assert [row["method"] for row in summary["summary"]] == ["finetune", "one"]
    assert summary["runs_finished"] == 2


def _flip(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["payload", "digest"])
def test_a_damaged_checkpoint_is_refused(where, tmp_path, monkeypatch, capsys):
    _interrupted_run(tmp_path, ["run", "--max-epochs", "1", "--tasks", "2"], monkeypatch, capsys)
    checkpoint = tmp_path / "checkpoint.pt"
    _flip(
        checkpoint, len(outputs.MAGIC) + 3 if where == "digest" else checkpoint.stat().st_size // 2
    )
    assert _one_line_error(["run", "--out", str(tmp_path), "--resume"], capsys) == (
        f"--resume: {checkpoint} is damaged (its sha256 does not match its content); resume from "
        "an intact copy or start again with --overwrite"
    )


def test_a_checkpoint_with_non_finite_weights_is_refused(tmp_path, monkeypatch, capsys):
    _interrupted_run(tmp_path, ["run", "--max-epochs", "1", "--tasks", "2"], monkeypatch, capsys)
    state = outputs.load_checkpoint(tmp_path)
    state["learner"]["models"][0]["trunk.4.weight"][0, 0] = float("nan")
    outputs.save_checkpoint(tmp_path, {k: v for k, v in state.items() if k != "format"})
    assert _one_line_error(["run", "--out", str(tmp_path), "--resume"], capsys) == (
        f"--resume: {tmp_path / 'checkpoint.pt'} holds non-finite weights (trunk.4.weight of "
        "network 0); it cannot be continued"
    )


def test_a_run_stopped_in_its_first_task_resumes_from_its_start_checkpoint(
    tmp_path, monkeypatch, capsys
):
    _interrupted_run(
        tmp_path, ["run", "--max-epochs", "1", "--tasks", "1"], monkeypatch, capsys, call=0
    )
    assert outputs.load_checkpoint(tmp_path)["results"]["matrix"] == []
    assert cli.main(["run", "--out", str(tmp_path), "--resume"]) == 0
    whole = run("digits", config={"max_epochs": 1}, tasks=1, progress="none")
    resumed = json.loads((tmp_path / "results.json").read_text())
    assert resumed["acc_matrix"] == whole["acc_matrix"] and resumed["resumed_at_task"] == [0]
