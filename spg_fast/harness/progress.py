"""Progress of a run: on a terminal, tqdm bars (the tasks, and below them the batches of the current
epoch or of the pass after a task); otherwise plain time-stamped lines; and always the lines in the
output folder's ``log.txt``. After every task the line says about how long the rest will take, and
after the run's first epoch, when the protocol's bound (every task running all its epochs) exceeds
``BOUND_SHOWN_S``, a line says that bound. Tasks are numbered from 0, as in the accuracy matrix."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, TextIO

PROGRESS = ("auto", "bar", "lines", "none")
BOUND_SHOWN_S = 600.0


def duration(seconds: float) -> str:
    """``seconds`` for people: under 1 s, 42 s, 3.5 min, 2.1 h."""
    if seconds < 1:
        return "under 1 s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def usage_text(usage: dict[str, Any] | None) -> str:
    """The capacity figures of the per-task line ("" for a method without a measure)."""
    if usage is None:
        return ""
    if usage["of"] == "units":
        return (
            f"; gates: mean {usage['mean']:.3f}, {100 * usage['above_0.5']:.1f}% of units above 0.5"
        )
    return (
        f"; importance: mean {usage['mean']:.3f}, {100 * usage['above_0.9']:.1f}% above 0.9, "
        f"head scale {usage['head_scale']:.3f}"
    )


class Progress:
    """``mode``: ``bar`` (tqdm on stderr), ``lines`` (log lines on stderr), ``none``; ``auto`` is
    ``bar`` when stderr is a terminal and ``lines`` otherwise. With ``log`` every line is appended
    there too. ``max_epochs`` is the protocol's bound per task."""

    def __init__(
        self,
        label: str,
        tasks: int,
        done: int,
        mode: str = "auto",
        log: Path | None = None,
        max_epochs: int | None = None,
    ) -> None:
        if mode not in PROGRESS:
            raise ValueError(f"progress must be one of {', '.join(PROGRESS)}, got {mode!r}")
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.label, self.tasks, self.done, self.mode = label, tasks, done, mode
        self.max_epochs = max_epochs
        self.first_epoch = True
        self.log: TextIO | None = open(log, "a") if log is not None else None  # noqa: SIM115 (closed in close)
        self.bar: Any = None
        self.inner: Any = None
        if mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=tasks, initial=done, desc=label, unit="task", leave=False)
            self.inner = tqdm(total=0, unit="batch", leave=False, position=1)

    @property
    def batches(self) -> bool:
        """Whether per-batch progress is shown (a bar on a terminal)."""
        return self.inner is not None

    def line(self, text: str) -> None:
        stamped = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {self.label}: {text}"
        if self.log is not None:
            self.log.write(stamped + "\n")
            self.log.flush()
        if self.mode == "lines":
            print(stamped, file=sys.stderr, flush=True)
        elif self.bar is not None:
            self.bar.write(stamped, file=sys.stderr)

    def step(self, what: str, done: int, total: int | None) -> None:
        """``done`` of ``total`` batches of ``what`` (an epoch, a pass after a task)."""
        if self.inner is None:
            return
        if self.inner.desc != what or self.inner.total != total or done < self.inner.n:
            self.inner.reset(total=total)
            self.inner.set_description_str(what, refresh=False)
        self.inner.update(done - self.inner.n)

    def epoch(self, info: dict[str, Any]) -> None:
        if self.bar is not None:
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
        if self.first_epoch and self.max_epochs is not None:
            self.first_epoch = False
            bound = info["seconds"] * self.max_epochs * (self.tasks - self.done)
            if bound > BOUND_SHOWN_S:
                self.line(
                    f"the first epoch took {info['seconds']:.1f} s: at most {self.max_epochs} "
                    f"epochs for each of {self.tasks - self.done} tasks would take about "
                    f"{duration(bound)}; early stopping usually ends tasks sooner (an estimate "
                    "follows every task)"
                )

    def task(
        self,
        task: int,
        epochs: int,
        train_s: float,
        importance_s: float,
        accuracies: list[float],
        usage: dict[str, Any] | None = None,
        left_s: float | None = None,
    ) -> None:
        if self.bar is not None:
            self.bar.update()
        accs = " ".join(f"{a:.4f}" for a in accuracies)
        left = ""
        if left_s is not None:
            left = f"; {'about ' if left_s >= 1 else ''}{duration(left_s)} left"
        self.line(
            f"task {task} of {self.tasks} done: {epochs} epochs, train {train_s:.1f}s, importance "
            f"{importance_s:.2f}s; test accuracy on tasks 0..{task}: {accs}{usage_text(usage)}"
            f"{left}"
        )

    def close(self) -> None:
        for bar in (self.inner, self.bar):
            if bar is not None:
                bar.close()
        if self.log is not None:
            self.log.close()
