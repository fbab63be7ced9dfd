"""Progress of a run: a tqdm bar on a terminal, plain time-stamped lines otherwise, and always the
lines in the output folder's ``log.txt``. Tasks are numbered from 0, as in the accuracy matrix."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, TextIO

from tqdm.auto import tqdm

PROGRESS = ("auto", "bar", "lines", "none")


class Progress:
    """``mode``: ``bar`` (tqdm on stderr), ``lines`` (log lines on stderr), ``none``; ``auto`` is
    ``bar`` when stderr is a terminal and ``lines`` otherwise. With ``log`` every line is appended
    there too."""

    def __init__(
        self, label: str, tasks: int, done: int, mode: str = "auto", log: Path | None = None
    ) -> None:
        if mode not in PROGRESS:
            raise ValueError(f"progress must be one of {', '.join(PROGRESS)}, got {mode!r}")
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.label, self.tasks, self.mode = label, tasks, mode
        self.log: TextIO | None = open(log, "a") if log is not None else None  # noqa: SIM115 (closed in close)
        self.bar = tqdm(
            total=tasks, initial=done, desc=label, unit="task", leave=False, disable=mode != "bar"
        )

    def line(self, text: str) -> None:
        stamped = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {self.label}: {text}"
        if self.log is not None:
            self.log.write(stamped + "\n")
            self.log.flush()
        if self.mode == "lines":
            print(stamped, file=sys.stderr, flush=True)

    def epoch(self, info: dict[str, Any]) -> None:
        self.bar.set_postfix(
            task=info["task"],
            epoch=info["epoch"],
            val_loss=f"{info['val_loss']:.3f}",
            val_acc=f"{info['val_acc']:.3f}",
        )
        restored = "; non-finite validation loss, best weights restored" if info["restored"] else ""
        self.line(
            f"task {info['task']} of {self.tasks} epoch {info['epoch']} train_loss "
            f"{info['train_loss']:.4f} val_loss {info['val_loss']:.4f} val_acc "
            f"{info['val_acc']:.4f} lr {info['lr']:.4g} {info['seconds']:.2f}s{restored}"
        )

    def task(
        self, task: int, epochs: int, train_s: float, importance_s: float, accuracies: list[float]
    ) -> None:
        self.bar.update()
        accs = " ".join(f"{a:.4f}" for a in accuracies)
        self.line(
            f"task {task} of {self.tasks} done: {epochs} epochs, train {train_s:.1f}s, importance "
            f"{importance_s:.2f}s; test accuracy on tasks 0..{task}: {accs}"
        )

    def close(self) -> None:
        self.bar.close()
        if self.log is not None:
            self.log.close()
