"""The output folder of a run or comparison: checked before any training, checkpoints and results
written atomically (a crash or Ctrl-C never leaves a half-written file), resumed only by the run
that wrote it."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

RUN_FILES = frozenset(
    {"results.json", "acc_matrix.csv", "acc_matrix.png", "log.txt", "checkpoint.pt"}
)
COMPARE_FILES = frozenset(
    {"comparison.json", "comparison.csv", "comparison.md", "comparison.png", "log.txt"}
)
RUN_FOLDER = re.compile(r"[a-z]+-seed\d+")
CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
MODES = ("new", "resume", "overwrite")


class OutputError(ValueError):
    """The output folder cannot be used as asked (the message names the option to change)."""


def _ours(folder: Path, compare: bool) -> tuple[list[str], list[str]]:
    """(names spg-fast writes, other names) in ``folder``; a comparison's run folders count as its
    own when they hold run files only."""
    mine, other = [], []
    for entry in sorted(folder.iterdir()):
        if entry.is_dir():
            ours = (
                compare
                and RUN_FOLDER.fullmatch(entry.name) is not None
                and not _ours(entry, compare=False)[1]
            )
        else:
            ours = (
                entry.name in RUN_FILES
                or (compare and entry.name in COMPARE_FILES)
                or entry.name.endswith(".tmp")
            )
        (mine if ours else other).append(entry.name)
    return mine, other


def check(out: Path, mode: str, compare: bool = False) -> list[str]:
    """Whether ``out`` can take a run (read only, before any data is read): new, empty, or holding
    an earlier run's files, which ``resume`` continues and ``overwrite`` replaces (returned: the
    names to remove). A folder holding anything spg-fast did not write is refused in every mode."""
    if mode not in MODES:
        raise ValueError(f"output mode must be one of {', '.join(MODES)}, got {mode!r}")
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out: {out} is a file, not a folder")
    if not out.is_dir():
        return []
    mine, other = _ours(out, compare)
    if other:
        raise OutputError(
            f"--out: {out} holds files spg-fast did not write ({', '.join(other[:3])}"
            f"{', ...' if len(other) > 3 else ''}); choose a new or empty folder"
        )
    if mine and mode == "new":
        raise OutputError(
            f"--out: {out} holds an earlier run ({', '.join(mine[:3])}"
            f"{', ...' if len(mine) > 3 else ''}); pass --resume to continue it or --overwrite to "
            "replace it"
        )
    return mine if mode == "overwrite" else []


def prepare(out: Path, remove: list[str]) -> None:
    """Create ``out`` (and check it is writable) after removing ``remove`` (from ``check``)."""
    for name in remove:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test.tmp"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"--out: cannot write to {out} ({e.strerror or e})") from e


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write ``path`` through a temporary file and a rename, so it is either the old or the
    new content."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(out: Path, state: dict[str, Any]) -> None:
    tmp = out / (CHECKPOINT + ".tmp")
    with open(tmp, "wb") as f:
        torch.save({"format": CHECKPOINT_FORMAT, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / CHECKPOINT)


def load_checkpoint(out: Path) -> dict[str, Any] | None:
    """The run state saved in ``out``, or None when there is none."""
    path = out / CHECKPOINT
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged or foreign file: torch raises several types
        raise OutputError(
            f"--resume: {path} is not a readable checkpoint ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise OutputError(f"--resume: {path} is not a checkpoint of this spg-fast version")
    return state
