"""The output folder of a run or comparison: checked before any training, checkpoints and results
written atomically (a crash or Ctrl-C never leaves a half-written file), checkpoints checksummed and
resumed only by the run that wrote them."""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

RUN_FILES = frozenset(
    {
        "results.json",
        "acc_matrix.csv",
        "acc_matrix.png",
        "log.txt",
        "checkpoint.pt",
        "metrics.jsonl",
        "metrics.csv",
    }
)
RUN_FOLDERS = frozenset({"tensorboard"})
COMPARE_FILES = frozenset(
    {
        "comparison.json",
        "comparison.csv",
        "comparison.md",
        "comparison.png",
        "log.txt",
        "settings.json",
    }
)
RUN_FOLDER = re.compile(r"[a-z]+-seed\d+")
CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 2
# A checkpoint file: MAGIC, the sha256 of the payload in hex, a newline, the payload (torch.save).
MAGIC = b"spg-fast checkpoint 2\n"
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
            ) or (not compare and entry.name in RUN_FOLDERS)
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
    names to remove). A folder holding anything spg-fast did not write is refused in every mode;
    ``resume`` needs a folder that holds a run (a checkpoint or results; a comparison's
    settings)."""
    if mode not in MODES:
        raise ValueError(f"output mode must be one of {', '.join(MODES)}, got {mode!r}")
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out: {out} is a file, not a folder")
    if not out.is_dir():
        if mode == "resume":
            raise OutputError(f"--resume: {out} does not exist: there is no run to continue")
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
    marks = ("settings.json",) if compare else (CHECKPOINT, "results.json")
    if mode == "resume" and not any(name in mine for name in marks):
        raise OutputError(
            f"--resume: {out} holds no run to continue (no {' or '.join(marks)}); start it "
            "without --resume"
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
    """``state`` as ``out/checkpoint.pt``, checksummed (see ``MAGIC``), written atomically."""
    payload = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **state}, payload)
    data = payload.getvalue()
    write_atomic(out / CHECKPOINT, MAGIC + hashlib.sha256(data).hexdigest().encode() + b"\n" + data)


def load_checkpoint(out: Path) -> dict[str, Any] | None:
    """The run state saved in ``out``, or None when there is none. A file whose checksum does not
    match its content, or that is not a checkpoint of this version, is an ``OutputError`` naming
    it."""
    path = out / CHECKPOINT
    if not path.exists():
        return None
    raw = path.read_bytes()
    head = len(MAGIC) + 65
    if not raw.startswith(MAGIC) or len(raw) < head:
        raise OutputError(f"--resume: {path} is not a checkpoint of this spg-fast version")
    digest, data = raw[len(MAGIC) : head - 1], raw[head:]
    if hashlib.sha256(data).hexdigest().encode() != digest:
        raise OutputError(
            f"--resume: {path} is damaged (its sha256 does not match its content); resume from "
            "an intact copy or start again with --overwrite"
        )
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # checksummed yet unreadable: written by another torch, say
        raise OutputError(
            f"--resume: {path} is not a readable checkpoint ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise OutputError(f"--resume: {path} is not a checkpoint of this spg-fast version")
    return state
