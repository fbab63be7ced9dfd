"""Progress and per-epoch records: on a terminal, bars over the batches of every epoch and of the
pass after a task; an estimate of the time left after every task, and of the protocol's bound after
the first epoch when it is long; metrics.jsonl and metrics.csv with every epoch (a resumed run keeps
the finished tasks' rows); TensorBoard scalars with --tensorboard, or a one-line error naming the
package when it is missing."""

from __future__ import annotations

import csv
import importlib.util
import json
import re

import pytest

from spg_fast import cli
from spg_fast.harness import extras, metrics_files, run
from spg_fast.harness.progress import Progress, duration


def test_bars_follow_the_batches_of_epochs_and_of_the_pass_after_a_task(tmp_path, capsys):
    run("digits", "ewc", config={"max_epochs": 1}, tasks=2, progress="bar", out=tmp_path)
    err = capsys.readouterr().err
    assert "task 0 epoch 1" in err and "task 1 epoch 1" in err
    assert re.search(r"fisher diagonal: +100%.*\b12/12\b", err)  # 227 samples, batches of 20
    # the lines still reach the log, and the terminal above the bars
    assert "task 1 of 2 done" in (tmp_path / "log.txt").read_text() and "task 1 of 2 done" in err
    run("digits", "spg", config={"max_epochs": 1}, tasks=2, progress="bar")
    err = capsys.readouterr().err
    # SPG's pass over task 1's 4 batches of 64 for heads 0 and 1 (one forward per batch for both)
    assert re.search(r"importance head 1 \(2 of 2 heads done\): +100%.*\b4/4\b", err)


def test_the_time_left_follows_every_task_but_the_last(capsys):
    run("digits", "finetune", config={"max_epochs": 1}, tasks=3, progress="lines")
    done = [line for line in capsys.readouterr().err.splitlines() if " done: " in line]
    assert len(done) == 3
    assert all(re.search(r"; (about \d+ s|under 1 s) left$", line) for line in done[:2])
    assert not done[2].endswith(" left")


def test_the_bound_of_a_long_protocol_is_said_after_the_first_epoch(tmp_path):
    bar = Progress("x", 5, 1, "none", tmp_path / "log.txt", max_epochs=500)
    info = {"task": 1, "epoch": 1, "train_loss": 1.0, "val_loss": 1.0, "val_acc": 0.5}
    bar.epoch({**info, "lr": 0.1, "seconds": 1.5, "restored": False})
    bar.epoch({**info, "epoch": 2, "lr": 0.1, "seconds": 1.5, "restored": False})
    bar.close()
    lines = (tmp_path / "log.txt").read_text().splitlines()
    assert lines[1].endswith(
        "x: the first epoch took 1.5 s: at most 500 epochs for each of 4 tasks would take about "
        "50.0 min; early stopping usually ends tasks sooner (an estimate follows every task)"
    )
    assert len(lines) == 3
    assert [duration(s) for s in (0.4, 42, 210, 9000)] == ["under 1 s", "42 s", "3.5 min", "2.5 h"]


def test_metrics_files_hold_every_epoch(tmp_path):
    result = run("digits", "spg", config={"max_epochs": 3}, tasks=2, out=tmp_path, progress="none")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == sum(result["epochs"])
    assert [(r["task"], r["epoch"]) for r in rows] == [(t, e) for t in (0, 1) for e in (1, 2, 3)]
    assert all(tuple(r) == metrics_files.COLUMNS for r in rows)
    table = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [float(r["val_loss"]) for r in table] == [r["val_loss"] for r in rows]


def test_a_resumed_run_keeps_the_rows_of_its_finished_tasks(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        "".join(
            json.dumps(dict.fromkeys(metrics_files.COLUMNS, 0) | {"task": t}) + "\n"
            for t in (0, 0, 1)
        )
    )
    files = metrics_files.MetricsFiles(tmp_path, done=1)
    files.close()
    assert [r["task"] for r in metrics_files.read_rows(tmp_path)] == [0, 0]
    assert len(list(csv.DictReader((tmp_path / "metrics.csv").open()))) == 2


class _Board:
    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_tensorboard_gets_epochs_accuracies_and_capacity(tmp_path, monkeypatch):
    board = _Board()
    monkeypatch.setattr(extras, "require_tensorboard", lambda: None)
    monkeypatch.setattr(metrics_files, "require_tensorboard", lambda: None)
    monkeypatch.setattr(metrics_files, "_summary_writer", lambda folder: board)
    result = run(
        "digits", "spg", config={"max_epochs": 2}, tasks=2, out=tmp_path, progress="none",
        tensorboard=True,
    )  # fmt: skip
    tags = {tag for tag, _, _ in board.scalars}
    assert {"epoch/train_loss", "epoch/val_loss", "epoch/val_acc", "epoch/lr"} <= tags
    assert {"accuracy/task_0", "accuracy/task_1", "accuracy/mean_so_far"} <= tags
    assert {"capacity/mean", "capacity/above_0.9", "capacity/head_scale"} <= tags
    steps = [step for tag, _, step in board.scalars if tag == "epoch/val_loss"]
    assert steps == [1, 2, 3, 4]
    assert (board.scalars[-1][0], board.scalars[-1][1]) == (
        "capacity/head_scale",
        result["importance_usage"][-1]["head_scale"],
    )


def test_tensorboard_missing_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "tensorboard" else find_spec(name, *a),
    )
    with pytest.raises(SystemExit) as stopped:
        cli.main(["run", "--tensorboard", "--out", str(tmp_path / "r")])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err == (
        "spg-fast: error: --tensorboard: the tensorboard package is not installed: pip install "
        "tensorboard (or the extra: pip install 'spg-fast[tensorboard]')\n"
    )
    assert not (tmp_path / "r").exists()


def test_tensorboard_writes_event_files(tmp_path):  # the dev extra installs tensorboard
    run("digits", "spg", config={"max_epochs": 1}, tasks=1, out=tmp_path, progress="none",
        tensorboard=True)  # fmt: skip
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
