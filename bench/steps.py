"""Masked optimizer steps on the CPU as a training loop calls them, against torch's unmasked fused
step, with the bytes each must move.

    python -m bench.steps [--numel 1e7] [--threads 2] [--rounds 15] [--out bench/results/<dir>]

One step of each case over the same parameters (``--numel`` float32 elements in tensors of about a
million, one small head), timed with ``time.perf_counter`` around ``opt.step()``, the cases
interleaved round by round so that a load change on the machine hits them alike; the median of
``--rounds`` rounds. Cases: torch's fused SGD-momentum and AdamW without SPG (the yardsticks);
``spg_fast.optim`` (the native CPU kernels) in both mask modes and every storage format; and
``spg.wrap`` around torch's fused optimizer in update mode (a snapshot copy, torch's step, then
the change scaled in one pass by the native kernel). Each ratio is to the unmasked fused step of
the same optimizer; the bytes model gives the floor that ratio could reach on a memory-bound
machine.
Writes ``steps.{md,json}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import spg_fast
from bench import bytes_model
from spg_fast import SPG, optim

CHUNK = 1 << 20
STORAGE = {"f32": torch.float32, "bf16": torch.bfloat16, "u8": torch.uint8}


class _Model(nn.Module):
    def __init__(self, numel: int) -> None:
        super().__init__()
        count = max(1, round(numel / CHUNK))
        sizes = [numel // count + (1 if i < numel % count else 0) for i in range(count)]
        self.trunk = nn.ParameterList(nn.Parameter(torch.randn(n)) for n in sizes)
        self.head = nn.Linear(16, 2)


_OPS = {"sgd": "sgd_momentum", "adamw": "adamw"}  # bench.bytes_model's names


def stream_bytes(optimizer: str, keep_bytes: int | None, wrap_update: bool) -> int:
    """Bytes per float32 element one step must move (``bench.bytes_model``): the optimizer's own
    streams, the stored keep factor read once inside a fused masked step, or, for update masking
    around torch's step, a snapshot copy and the update mask's pass."""
    op = _OPS[optimizer]
    if keep_bytes is None:
        return bytes_model.bytes_per_element(op)
    if not wrap_update:
        return bytes_model.bytes_per_element(f"{op}_masked", keep_bytes=keep_bytes)
    return (
        bytes_model.bytes_per_element(op)
        + bytes_model.bytes_per_element("copy")
        + bytes_model.bytes_per_element("update_mask", keep_bytes=keep_bytes)
    )


def _cases(numel: int) -> dict[str, tuple[str, Callable[[], Any], int]]:
    """name -> (optimizer kind, step, bytes per element)."""
    cases: dict[str, tuple[str, Callable[[], Any], int]] = {}

    def model_with_grads() -> _Model:
        torch.manual_seed(0)
        model = _Model(numel)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        return model

    def trained_spg(model: _Model, storage: torch.dtype) -> SPG:
        spg = SPG(model, heads="head", importance_dtype=storage)
        keep = {n: torch.rand(p.shape) for n, p in spg.shared_parameters.items()}
        spg.load_state_dict({"format": 2, "tasks_finished": 1, "keep": keep})
        return spg

    fused = {"sgd": dict(lr=1e-3, momentum=0.9), "adamw": dict(lr=1e-3)}
    torch_classes = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}
    ours = {"sgd": optim.SGD, "adamw": optim.AdamW}
    for kind, kwargs in fused.items():
        model = model_with_grads()
        opt = torch_classes[kind](model.parameters(), fused=True, **kwargs)
        cases[f"torch {kind} fused (no SPG)"] = (kind, opt.step, stream_bytes(kind, None, False))
        for label, storage in STORAGE.items():
            for mask in ("gradient", "update"):
                model = model_with_grads()
                spg = trained_spg(model, storage)
                opt = ours[kind](model.parameters(), spg=spg, mask=mask, **kwargs)
                name = f"spg_fast.optim {kind} {mask} {label}"
                cases[name] = (kind, opt.step, stream_bytes(kind, storage.itemsize, False))
        for label in ("f32", "u8"):
            model = model_with_grads()
            spg = trained_spg(model, STORAGE[label])
            inner = torch_classes[kind](model.parameters(), fused=True, **kwargs)
            opt = spg.wrap(inner, mask="update")
            name = f"spg.wrap(torch {kind} fused) update {label}"
            cases[name] = (kind, opt.step, stream_bytes(kind, STORAGE[label].itemsize, True))
    return cases


def measure(numel: int, rounds: int) -> list[dict[str, Any]]:
    cases = _cases(numel)
    for _, step, _ in cases.values():  # warm up: compile the native steps, fault pages in
        step()
        step()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, (_, step, _) in cases.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    base = {
        kind: statistics.median(times[f"torch {kind} fused (no SPG)"]) for kind in ("sgd", "adamw")
    }
    rows = []
    for name, (kind, _, nbytes) in cases.items():
        median = statistics.median(times[name])
        floor = nbytes / stream_bytes(kind, None, False)
        rows.append(
            {
                "case": name,
                "optimizer": kind,
                "ms": median * 1e3,
                "vs_torch_fused": median / base[kind],
                "bytes_per_element": nbytes,
                "bytes_floor": floor,
                "gb_per_s": nbytes * numel / median / 1e9,
            }
        )
        print(f"{name:44} {median * 1e3:8.2f} ms  {rows[-1]['vs_torch_fused']:.3f}x", flush=True)
    return rows


def _markdown(rows: list[dict[str, Any]], env: dict[str, Any]) -> str:
    lines = [
        f"One optimizer step over {env['numel']:.3g} float32 parameters, median of "
        f"{env['rounds']} interleaved rounds; {env['cpu']}, {env['threads']} thread(s), load "
        f"average {env['load_before']} before and {env['load_after']} after, torch "
        f"{env['torch']}, {env['date']}.",
        "",
        "| case | ms | vs torch fused | bytes/element | bytes floor | GB/s |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['case']} | {r['ms']:.2f} | {r['vs_torch_fused']:.3f}x | {r['bytes_per_element']} "
        f"| {r['bytes_floor']:.3f}x | {r['gb_per_s']:.1f} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.steps", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--numel", type=float, default=1e7, help="parameters (default 1e7)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    parser.add_argument("--out", type=Path, help="folder for steps.{md,json}")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    rows = measure(int(args.numel), args.rounds)
    env = {
        "numel": args.numel,
        "rounds": args.rounds,
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "spg_fast": spg_fast.__version__,
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "-m", "bench.steps", *(argv or sys.argv[1:])]),
    }
    print(_markdown(rows, env))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "steps.md").write_text(_markdown(rows, env))
        (args.out / "steps.json").write_text(
            json.dumps({"environment": env, "rows": rows}, indent=1)
        )
    return rows


if __name__ == "__main__":
    main()
