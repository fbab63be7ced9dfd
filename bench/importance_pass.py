"""The whole end-of-task importance pass, timed: spg-fast's schedules against the per-head passes and the floor.

    python -m bench.importance_pass [--out DIR] [--models alexnet,mlp] [--ks 0,4,9,19] [--batches 8]
                                    [--rounds 3] [--stats-repeats 15] [--threads N]

For each model (the harness's AlexNet on 3x32x32 inputs and a 784-1024-1024 MLP, dropout 0,
batch 64, 20 heads) and each task index k, one pass over the same batches per configuration, in
interleaved rounds (median):
- ``floor``: (k+1) x batches forward+backward into ``.grad`` and nothing else, the compute of the
  per-head passes;
- ``per-head, float32 stats``: the authors' procedure: per head, forward+backward over every batch
  into ``.grad``, then float32 ``var_mean`` + ``tanh`` statistics and the max;
- ``spg-fast per-head``: ``end_task(shared_forward=False)``;
- ``spg-fast auto``: ``end_task()`` (dropout 0: one forward per batch for all heads, one group);
- ``spg-fast shared, 2 groups``: ``end_task(shared_forward=True)`` with a memory budget of half the
  heads' buffers.
A second table times the importance step of one head on the model's shared tensors: spg-fast's
float64 statistics over cache-sized chunks, float32 ``var_mean`` + ``tanh``, and the full-size
float64 conversion it replaced. Writes ``results.md``, ``results.csv`` (passes), ``statistics.csv``
and ``results.json`` under ``--out``.
"""  # noqa: E501

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import spg_fast
from spg_fast import SPG, reference
from spg_fast.harness.models import MultiHeadNet, alexnet, mlp

HEADS = 20
BATCH = 64
MODELS: dict[str, tuple[Callable[[], MultiHeadNet], tuple[int, ...]]] = {
    "alexnet": (lambda: alexnet((3, 32, 32), [10] * HEADS), (3, 32, 32)),
    "mlp": (lambda: mlp((784,), [10] * HEADS, hidden=1024), (784,)),
}


def _batches(shape: tuple[int, ...], n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn((BATCH, *shape), generator=g), torch.randint(0, 10, (BATCH,), generator=g))
        for _ in range(n)
    ]


def _head_loss(out: torch.Tensor, y: torch.Tensor, head: int, k: int) -> torch.Tensor:
    return F.cross_entropy(out, y) if head == k else out.sum()


def float32_importance_max_(accs: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    """The authors' statistics in float32: ``A <- max(A, |tanh((h - mean) / std)|)``."""
    for a, h in zip(accs, grads, strict=True):
        var, mean = torch.var_mean(h)
        torch.maximum(a, torch.tanh((h - mean) / var.sqrt()).abs(), out=a)


def float64_copy_importance_max_(accs: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    """The statistics spg-fast had before: each whole gradient converted to float64, then var_mean,
    aminmax, tanh and where at double width."""
    for a, h in zip(accs, grads, strict=True):
        x = h.to(torch.float64)
        var, mean = torch.var_mean(x)
        std = var.sqrt()
        lo, hi = torch.aminmax(x)
        valid = (hi > lo) & (std > 0) & torch.isfinite(std)
        z = (x - mean) / torch.where(valid, std, torch.ones_like(std))
        torch.maximum(a, torch.where(valid, z.tanh().abs(), torch.zeros_like(z)).to(a.dtype), out=a)


def _per_head_passes(model: MultiHeadNet, batches: list, k: int, stats: bool) -> None:
    shared = list(model.trunk.parameters())
    accs = [torch.zeros_like(p) for p in shared]
    for head in range(k + 1):
        model.zero_grad(set_to_none=True)
        for x, y in batches:
            _head_loss(model(x, head), y, head, k).backward()
        if stats:
            float32_importance_max_(accs, [p.grad for p in shared])
    model.zero_grad(set_to_none=True)


Config = tuple[Callable[[], object], Callable[[], object]]  # (untimed setup, the timed call)


def _nothing() -> None:
    """The setup of a configuration that needs none."""


def _configurations(model: MultiHeadNet, batches: list, k: int) -> dict[str, Config]:
    spg = SPG(model, heads=model.heads)
    state = spg.state_dict()
    state.update(
        tasks_finished=k,
        importance={n: torch.zeros_like(p) for n, p in spg.shared_parameters.items()},
    )
    per_head_bytes = sum(p.numel() * p.element_size() for p in spg.shared_parameters.values())
    half = per_head_bytes * math.ceil((k + 1) / 2)

    def reset() -> None:  # SPG as after task k - 1: not timed, it is the benchmark's bookkeeping
        spg.load_state_dict(state if k else {**state, "tasks_finished": 0, "importance": {}})

    def end_task(**options: object) -> Config:
        return reset, lambda: spg.end_task(k, batches, **options)

    configs: dict[str, Config] = {
        "floor": (_nothing, lambda: _per_head_passes(model, batches, k, stats=False)),
        "per-head, float32 stats": (
            _nothing,
            lambda: _per_head_passes(model, batches, k, stats=True),
        ),
        "spg-fast per-head": end_task(shared_forward=False),
        "spg-fast auto": end_task(),
    }
    if k >= 1:
        configs["spg-fast shared, 2 groups"] = end_task(shared_forward=True, memory_budget=half)
    return configs


def time_passes(name: str, k: int, n_batches: int, rounds: int, warm_up: bool) -> list[dict]:
    """Every configuration at task index ``k``, timed in ``rounds`` interleaved rounds; with
    ``warm_up``, one untimed round first (once per model and process is enough: later ``k`` reuse
    the warm allocator and kernels)."""
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build().train()
    batches = _batches(shape, n_batches)
    configs = _configurations(model, batches, k)
    if warm_up:
        for setup, fn in configs.values():
            setup()
            fn()
    reports: dict[str, object] = {}
    times: dict[str, list[float]] = {label: [] for label in configs}
    for r in range(rounds):
        for label, (setup, fn) in configs.items():
            setup()
            start = time.perf_counter()
            reports[label] = fn()
            times[label].append(time.perf_counter() - start)
        print(
            f"  {name} k={k} round {r + 1}/{rounds}: "
            + ", ".join(f"{label} {t[-1]:.2f}s" for label, t in times.items()),
            flush=True,
        )
    reference_time = statistics.median(times["per-head, float32 stats"])
    rows = []
    for label, t in times.items():
        report = reports[label]
        rows.append(
            {
                "model": name,
                "k": k,
                "heads": k + 1,
                "batches": n_batches,
                "config": label,
                "seconds": statistics.median(t),
                "vs_per_head_float32": statistics.median(t) / reference_time,
                "shared_forward": getattr(report, "shared_forward", ""),
                "group_size": getattr(report, "group_size", ""),
                "passes": getattr(report, "passes", ""),
                "all_seconds": t,
            }
        )
    return rows


def time_statistics(name: str, repeats: int) -> list[dict]:
    """One head's importance step over the model's shared tensors (gradient-like values: small
    mean, spread)."""
    build, _ = MODELS[name]
    model = build()
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=g) * 1e-3 + 1e-4 for p in model.trunk.parameters()]
    accs = [torch.zeros_like(h) for h in grads]
    impls = {
        "spg-fast (float64, chunked)": reference.importance_max_,
        "float32 var_mean + tanh": float32_importance_max_,
        "float64 full-size copy (before)": float64_copy_importance_max_,
    }
    times: dict[str, list[float]] = {label: [] for label in impls}
    for fn in impls.values():
        fn(accs, grads)
    for _ in range(repeats):
        for label, fn in impls.items():
            start = time.perf_counter()
            fn(accs, grads)
            times[label].append(time.perf_counter() - start)
    base = statistics.median(times["float32 var_mean + tanh"])
    numel = sum(h.numel() for h in grads)
    return [
        {
            "model": name,
            "params": numel,
            "tensors": len(grads),
            "impl": label,
            "seconds": statistics.median(t),
            "vs_float32": statistics.median(t) / base,
        }
        for label, t in times.items()
    ]


def environment() -> dict:
    return {
        "device": platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "spg_fast": spg_fast.__version__,
        "python": platform.python_version(),
        "batch": BATCH,
        "heads": HEADS,
    }


def markdown(env: dict, passes: list[dict], stats: list[dict]) -> str:
    lines = [
        f"# End-of-task importance pass on {env['device']} ({env['date']})",
        "",
        f"torch {env['torch']}, {env['threads']} torch threads on {env['cpus']} CPUs (load "
        f"average {env['load_average_at_start'][0]:.1f} at the start, "
        f"{env['load_average_at_end'][0]:.1f} at the end: the machine is shared), batch "
        f"{env['batch']}, dropout 0; medians of interleaved rounds. Ratios are to the per-head "
        "passes with float32 statistics (the authors' procedure).",
        "",
        "| model | k | batches | configuration | s | vs per-head float32 | shared forward "
        "| heads per group |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in passes:
        lines.append(
            f"| {r['model']} | {r['k']} | {r['batches']} | {r['config']} | {r['seconds']:.3f} | "
            f"{r['vs_per_head_float32']:.2f}x | {r['shared_forward']} | {r['group_size']} |"
        )
    lines += [
        "",
        "## Importance step of one head (all shared tensors)",
        "",
        "| model | params | implementation | ms | vs float32 |",
        "|---|---|---|---|---|",
    ]
    for r in stats:
        lines.append(
            f"| {r['model']} | {r['params']:,} | {r['impl']} | {r['seconds'] * 1e3:.2f} | "
            f"{r['vs_float32']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    today = datetime.date.today().isoformat()
    parser.add_argument(
        "--out", type=Path, default=Path(f"bench/results/cpu-2core-{today}-importance-pass")
    )
    parser.add_argument("--models", default="alexnet,mlp")
    parser.add_argument("--ks", default="0,4,9,19")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stats-repeats", type=int, default=15)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's choice)"
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; valid: {', '.join(MODELS)}")
    ks = [int(k) for k in args.ks.split(",") if k]
    if any(not 0 <= k < HEADS for k in ks):
        parser.error(f"--ks must lie in 0..{HEADS - 1}")
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment()
    passes = []
    for name in models:
        for i, k in enumerate(ks):
            print(f"{name}, k = {k}", flush=True)
            passes += time_passes(name, k, args.batches, args.rounds, warm_up=i == 0)
    stats = [row for name in models for row in time_statistics(name, args.stats_repeats)]
    env["load_average_at_end"] = os.getloadavg()
    (args.out / "results.md").write_text(markdown(env, passes, stats))
    (args.out / "results.json").write_text(
        json.dumps({"environment": env, "passes": passes, "statistics": stats}, indent=1)
    )
    for file, rows in (("results.csv", passes), ("statistics.csv", stats)):
        with (args.out / file).open("w", newline="") as f:
            writer = csv.DictWriter(
                f, fieldnames=[k for k in rows[0] if k != "all_seconds"], extrasaction="ignore"
            )
            writer.writeheader()
            writer.writerows(rows)
    print(markdown(env, passes, stats))


if __name__ == "__main__":
    main()
