"""Per-epoch metrics of a run in its output folder: ``metrics.jsonl`` (one JSON object per epoch)
and ``metrics.csv`` (the same rows), and with ``tensorboard`` the same scalars and, per task, the
test accuracies and the capacity used in ``tensorboard/`` (TensorBoard's event files). A resumed run
first drops the rows of the tasks it will train again."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from spg_fast.harness.extras import require_tensorboard

COLUMNS = ("task", "epoch", "train_loss", "val_loss", "val_acc", "lr", "seconds", "restored")
JSONL, CSV, TENSORBOARD = "metrics.jsonl", "metrics.csv", "tensorboard"


def read_rows(out: Path) -> list[dict[str, Any]]:
    """The epoch rows in ``out/metrics.jsonl`` (none when it is missing)."""
    path = out / JSONL
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _summary_writer(folder: Path) -> Any:
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(folder))


class MetricsFiles:
    """Writes the epoch rows of a run into ``out``, keeping the rows of its first ``done`` tasks
    that are already there."""

    def __init__(self, out: Path, done: int, tensorboard: bool = False) -> None:
        if tensorboard:
            require_tensorboard()
        kept = [row for row in read_rows(out) if row["task"] < done]
        self.jsonl = open(out / JSONL, "w")  # noqa: SIM115 (closed in close)
        self.csv_file = open(out / CSV, "w", newline="")  # noqa: SIM115 (closed in close)
        self.csv = csv.DictWriter(self.csv_file, COLUMNS)
        self.csv.writeheader()
        for row in kept:
            self._write(row)
        self.steps = len(kept)
        self.board = _summary_writer(out / TENSORBOARD) if tensorboard else None

    def _write(self, row: dict[str, Any]) -> None:
        self.jsonl.write(json.dumps(row) + "\n")
        self.csv.writerow(row)
        self.jsonl.flush()
        self.csv_file.flush()

    def epoch(self, info: dict[str, Any]) -> None:
        """One epoch's row (``train_task``'s ``on_epoch`` dict)."""
        self._write({k: info[k] for k in COLUMNS})
        self.steps += 1
        if self.board is not None:
            for key in ("train_loss", "val_loss", "val_acc", "lr"):
                self.board.add_scalar(f"epoch/{key}", info[key], self.steps)

    def task(self, task: int, accuracies: list[float], usage: dict[str, Any] | None) -> None:
        """After ``task``: the test accuracy on every task so far, their mean, and the capacity
        figures (TensorBoard only)."""
        if self.board is None:
            return
        for j, accuracy in enumerate(accuracies):
            self.board.add_scalar(f"accuracy/task_{j}", accuracy, task)
        self.board.add_scalar("accuracy/mean_so_far", sum(accuracies) / len(accuracies), task)
        for key, value in (usage or {}).items():
            if isinstance(value, float):
                self.board.add_scalar(f"capacity/{key}", value, task)
        self.board.flush()

    def close(self) -> None:
        self.jsonl.close()
        self.csv_file.close()
        if self.board is not None:
            self.board.close()
