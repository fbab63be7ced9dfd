"""What SPG keeps in memory per shared parameter element after ``end_task``, for each importance
storage format (``spg_fast.storage``), on the CPU.

    python -m bench.memory [--numel 64e6] [--out bench/results/<machine>-memory]

Each format runs in a fresh subprocess: a model of ``--numel`` shared elements (square linear
layers) and one head is built, then ``end_task`` runs over one small batch. Two measures:
``held``, the bytes of every tensor the SPG object references (its stored keep factors and the head
scale: what it keeps alive), and ``resident``, the growth of the process's resident set from just
before ``end_task`` to after it (after ``gc.collect()`` and ``malloc_trim``, so memory the pass used
and freed is not counted, and after one ``end_task`` on a one-layer model, so what the process's
first backward initialises is not counted either). Both are divided by the number of shared
elements. Writes ``memory.{md,json}``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

FORMATS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "uint8": torch.uint8}
WIDTH = 2048


def _resident_bytes() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * 4096


def _trim() -> None:
    gc.collect()
    with contextlib.suppress(OSError):  # not glibc: freed memory may stay resident
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class _Model(nn.Module):
    def __init__(self, layers: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(*(nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(layers)))
        self.head = nn.Linear(WIDTH, 2)

    def forward(self, x: Tensor, _task: int = 0) -> Tensor:
        return self.head(self.trunk(x))


def held_bytes(spg: Any) -> int:
    """Bytes of every distinct tensor storage the SPG object's attributes reference (walking its
    dicts, lists and tuples), the model's parameters and buffers excepted: the memory SPG keeps
    alive of its own."""
    model = {
        t.untyped_storage().data_ptr() for t in (*spg.model.parameters(), *spg.model.buffers())
    }
    seen: dict[int, int] = {}
    stack = [v for k, v in vars(spg).items() if k not in ("model", "_inner")]
    while stack:
        item = stack.pop()
        if isinstance(item, Tensor):
            storage = item.untyped_storage()
            if storage.data_ptr() not in model:
                seen[storage.data_ptr()] = storage.nbytes()
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif hasattr(item, "__dataclass_fields__"):
            stack.extend(vars(item).values())
    return sum(seen.values())


def measure(numel: int, storage: str) -> dict[str, Any]:
    """One format, in this process: bytes per shared element held and resident after end_task."""
    from spg_fast import SPG

    torch.set_num_threads(1)
    layers = max(1, round(numel / WIDTH**2))
    model = _Model(layers)
    spg = SPG(model, heads="head", importance_dtype=FORMATS[storage])
    shared = sum(p.numel() for p in spg.shared_parameters.values())
    batch = [(torch.randn(4, WIDTH), torch.tensor([0, 1, 0, 1]))]
    # One end_task on a small model first: what the first backward initialises once per process
    # (autograd's engine, thread pools; about 15-20 MB measured) is not SPG's memory.
    warm = _Model(1)
    SPG(warm, heads="head", importance_dtype=FORMATS[storage]).end_task(0, batch)
    del warm
    _trim()
    before = _resident_bytes()
    spg.end_task(0, batch)
    _trim()
    after = _resident_bytes()
    return {
        "storage": storage,
        "shared_elements": shared,
        "held_bytes_per_element": held_bytes(spg) / shared,
        "resident_bytes_per_element": (after - before) / shared,
    }


def _markdown(rows: list[dict[str, Any]], env: dict[str, Any]) -> str:
    lines = [
        f"SPG's memory per shared element after end_task; {env['cpu']}, torch {env['torch']}, "
        f"{env['date']}. held: the tensors SPG references; resident: growth of the resident set "
        "across end_task (after gc and malloc_trim).",
        "",
        "| importance_dtype | shared elements | held (B/element) | resident (B/element) |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['storage']} | {r['shared_elements']:,} | {r['held_bytes_per_element']:.3f} "
        f"| {r['resident_bytes_per_element']:.3f} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.memory", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--numel", type=float, default=64e6, help="shared elements (default 64e6)")
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated formats")
    parser.add_argument("--out", type=Path, help="folder for memory.{md,json}")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one format here
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(int(args.numel), args.one)))
        return []
    rows = []
    for storage in args.formats.split(","):
        if storage not in FORMATS:
            parser.error(f"--formats: {storage!r} is not one of {', '.join(FORMATS)}")
        command = [
            sys.executable,
            "-m",
            "bench.memory",
            "--numel",
            str(args.numel),
            "--one",
            storage,
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    env = {
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "-m", "bench.memory", *(argv or sys.argv[1:])]),
    }
    print(_markdown(rows, env))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "memory.md").write_text(_markdown(rows, env))
        (args.out / "memory.json").write_text(
            json.dumps({"environment": env, "rows": rows}, indent=1)
        )
    return rows


if __name__ == "__main__":
    main()
