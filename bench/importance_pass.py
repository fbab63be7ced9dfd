"""The whole end-of-task importance pass, timed: spg-fast's schedules against the authors' per-head passes.

    python -m bench.importance_pass [--out DIR] [--models alexnet-flat,alexnet,mlp-flat,mlp]
                                    [--ks 0,4,9,19] [--batches 8] [--rounds 3] [--threads 1,2]
                                    [--stats-repeats 15] [--backward-rounds 5]

Models (dropout 0, batch 64, 20 linear heads of 10 classes), each in two layouts:
- ``alexnet-flat``: the authors' AlexNet for 3x32x32 inputs written as they write it: conv and
  linear layers as attributes, ReLU and pooling as functional calls in ``forward``, then
  ``self.heads[t](h)``; ``alexnet``: the same network with its layers in one ``trunk`` submodule
  (the harness's);
- ``mlp-flat`` and ``mlp``: a 784-1024-1024 ReLU MLP, flat and as a trunk submodule.

For each thread count, model and task index k, one pass over the same batches per configuration,
in interleaved rounds; the ratio of each round to that round's authors' procedure, median over the
rounds (the load average is recorded with every round: the machine is shared):
- ``floor``: (k+1) x batches forward+backward into ``.grad`` and nothing else, the compute of the
  per-head passes;
- ``per-head, float32 stats``: the authors' procedure: per head, forward+backward over every batch
  into ``.grad``, then float32 ``var_mean`` + ``tanh`` statistics and the max;
- ``spg-fast per-head``: ``end_task(shared_forward=False)``;
- ``spg-fast auto``: ``end_task()`` (dropout 0: the forward shared by all heads, one group);
- ``spg-fast shared, 2 groups``: ``end_task(shared_forward=True)`` with a memory budget of half the
  heads' buffers;
- ``spg-fast sums only``: the default pass's gradient sums alone, without statistics (against
  ``floor``: what the schedule saves, whatever the statistics cost).
Two more tables: the importance step of one head on the model's shared tensors (spg-fast's float64
statistics over cache-sized chunks, float32 ``var_mean`` + ``tanh``, and the full-size float64
conversion it replaced), and the backward through the shared part for 10 heads from one captured
input, one ``autograd.grad`` per head against one batched over the heads (``is_grads_batched``).
Writes ``results.md``, ``results.csv`` (passes), ``statistics.csv``, ``backward.csv`` and
``results.json`` under ``--out``.
"""  # noqa: E501

from __future__ import annotations

import argparse
import csv
import datetime
import functools
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
from torch import Tensor, nn

import spg_fast
from spg_fast import SPG, PassReport, reference
from spg_fast._importance_pass import ImportancePass
from spg_fast.harness.models import alexnet, mlp

HEADS = 20
BATCH = 64
AUTHORS = "per-head, float32 stats"
CONFIGS = (
    "floor",
    AUTHORS,
    "spg-fast per-head",
    "spg-fast auto",
    "spg-fast sums only",
    "spg-fast shared, 2 groups",  # k >= 1
)


class FlatAlexNet(nn.Module):
    """The authors' AlexNet (``approaches/spg`` of their code) as they write it, for 3x32x32
    inputs: conv and linear layers as attributes, ReLU and 2x2 max-pooling as functional calls
    and dropout modules (rate 0 here) in ``forward``, then one linear head per task."""

    def __init__(self, heads: int = HEADS, hidden: int = 2048) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 64, 32 // 8)  # 29x29, pooled to 14x14
        self.c2 = nn.Conv2d(64, 128, 32 // 10)  # 12x12, pooled to 6x6
        self.c3 = nn.Conv2d(128, 256, 2)  # 5x5, pooled to 2x2
        self.drop1 = nn.Dropout(0.0)
        self.drop2 = nn.Dropout(0.0)
        self.fc1 = nn.Linear(256 * 2 * 2, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.heads = nn.ModuleList(nn.Linear(hidden, 10) for _ in range(heads))

    def forward(self, x: Tensor, t: int) -> Tensor:
        h = F.max_pool2d(self.drop1(F.relu(self.c1(x))), 2)
        h = F.max_pool2d(self.drop1(F.relu(self.c2(h))), 2)
        h = F.max_pool2d(self.drop2(F.relu(self.c3(h))), 2)
        h = h.view(h.shape[0], -1)
        h = self.drop2(F.relu(self.fc1(h)))
        h = self.drop2(F.relu(self.fc2(h)))
        return self.heads[t](h)


class FlatMLP(nn.Module):
    """The 784-1024-1024 ReLU MLP with its layers as attributes and functional ReLU."""

    def __init__(self, heads: int = HEADS, hidden: int = 1024) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.heads = nn.ModuleList(nn.Linear(hidden, 10) for _ in range(heads))

    def forward(self, x: Tensor, t: int) -> Tensor:
        h = F.relu(self.fc1(x.flatten(1)))
        return self.heads[t](F.relu(self.fc2(h)))


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "alexnet-flat": (FlatAlexNet, (3, 32, 32)),
    "alexnet": (lambda: alexnet((3, 32, 32), [10] * HEADS), (3, 32, 32)),
    "mlp-flat": (FlatMLP, (784,)),
    "mlp": (lambda: mlp((784,), [10] * HEADS, hidden=1024), (784,)),
}


def shared_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter outside ``model.heads``."""
    heads = {id(p) for p in model.heads.parameters()}
    return [p for p in model.parameters() if id(p) not in heads]


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


def _per_head_passes(model: nn.Module, batches: list, k: int, stats: bool) -> None:
    shared = shared_parameters(model)
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


def _configurations(model: nn.Module, batches: list, k: int) -> dict[str, Config]:
    spg = SPG(model, heads=model.heads)
    state = {  # keep factors 1 - A of 1: nothing important yet
        "format": 2,
        "tasks_finished": k,
        "keep": {n: torch.ones_like(p) for n, p in spg.shared_parameters.items()},
    }
    per_head_bytes = sum(p.numel() * p.element_size() for p in spg.shared_parameters.values())
    half = per_head_bytes * math.ceil((k + 1) / 2)

    def reset() -> None:  # SPG as after task k - 1: not timed, it is the benchmark's bookkeeping
        spg.load_state_dict(state if k else {**state, "tasks_finished": 0, "keep": {}})

    def end_task(**options: object) -> Config:
        return reset, lambda: spg.end_task(k, batches, **options)

    def gradient_sums() -> PassReport:
        """The pass alone: every head's gradient sums, no statistics (to compare with the
        floor)."""
        engine = ImportancePass(
            model,
            shared_parameters(model),
            model.heads.parameters(),
            list(range(k + 1)),
            batches,
            model,
            lambda head: functools.partial(_head_loss, head=head, k=k),
            lambda batch: batch,
        )
        for _ in engine.run():
            pass
        return engine.report

    configs: dict[str, Config] = {
        "floor": (_nothing, lambda: _per_head_passes(model, batches, k, stats=False)),
        AUTHORS: (_nothing, lambda: _per_head_passes(model, batches, k, stats=True)),
        "spg-fast per-head": end_task(shared_forward=False),
        "spg-fast auto": end_task(),
        "spg-fast sums only": (_nothing, gradient_sums),
    }
    if k >= 1:
        configs["spg-fast shared, 2 groups"] = end_task(shared_forward=True, memory_budget=half)
    return configs


def time_passes(
    name: str, k: int, n_batches: int, rounds: int, warm_up: bool, only: list[str] | None = None
) -> list[dict]:
    """Every configuration at task index ``k`` (those named in ``only`` and the authors'
    procedure, when given), timed in ``rounds`` interleaved rounds; with ``warm_up``, one untimed
    round first (once per model, thread count and process is enough: later ``k`` reuse the warm
    allocator and kernels)."""
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build().train()
    batches = _batches(shape, n_batches)
    configs = {
        label: config
        for label, config in _configurations(model, batches, k).items()
        if only is None or label in only or label == AUTHORS
    }
    if warm_up:
        for setup, fn in configs.values():
            setup()
            fn()
    reports: dict[str, object] = {}
    times: dict[str, list[float]] = {label: [] for label in configs}
    cpu: dict[str, list[float]] = {label: [] for label in configs}  # this process's CPU time
    loads = []
    for r in range(rounds):
        for label, (setup, fn) in configs.items():
            setup()
            start, start_cpu = time.perf_counter(), time.process_time()
            reports[label] = fn()
            times[label].append(time.perf_counter() - start)
            cpu[label].append(time.process_time() - start_cpu)
        loads.append(os.getloadavg()[0])
        print(
            f"  {name} k={k} {torch.get_num_threads()} thread(s) round {r + 1}/{rounds} (load "
            f"{loads[-1]:.1f}): "
            + ", ".join(f"{label} {t[-1]:.2f}s" for label, t in times.items()),
            flush=True,
        )
    authors, authors_cpu = times[AUTHORS], cpu[AUTHORS]
    rows = []
    for label, t in times.items():
        report = reports[label]
        rows.append(
            {
                "model": name,
                "threads": torch.get_num_threads(),
                "k": k,
                "heads": k + 1,
                "batches": n_batches,
                "config": label,
                "seconds": statistics.median(t),
                "vs_per_head_float32": statistics.median(
                    a / b for a, b in zip(t, authors, strict=True)
                ),
                "cpu_vs_per_head_float32": statistics.median(
                    a / b for a, b in zip(cpu[label], authors_cpu, strict=True)
                ),
                "shared_forward": getattr(report, "shared_forward", ""),
                "strategy": getattr(report, "strategy", ""),
                "group_size": getattr(report, "group_size", ""),
                "passes": getattr(report, "passes", ""),
                "all_seconds": t,
                "load_averages": loads,
            }
        )
    return rows


def time_statistics(name: str, repeats: int) -> list[dict]:
    """One head's importance step over the model's shared tensors (gradient-like values: small
    mean, spread)."""
    build, _ = MODELS[name]
    model = build()
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=g) * 1e-3 + 1e-4 for p in shared_parameters(model)]
    accs = [torch.zeros_like(h) for h in grads]  # the importance A
    keeps = [torch.ones_like(h) for h in grads]  # spg-fast's stored keep factors 1 - A
    impls = {
        "spg-fast (float64, chunked)": lambda: reference.accumulate_(keeps, grads),
        "float32 var_mean + tanh": lambda: float32_importance_max_(accs, grads),
        "float64 full-size copy (before)": lambda: float64_copy_importance_max_(accs, grads),
    }
    times: dict[str, list[float]] = {label: [] for label in impls}
    for fn in impls.values():
        fn()
    for _ in range(repeats):
        for label, fn in impls.items():
            start = time.perf_counter()
            fn()
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


def time_backward(name: str, heads: int, rounds: int) -> list[dict]:
    """The backward through the shared part of a model for ``heads`` heads from one batch's
    captured head input: one ``autograd.grad`` per head (what the pass does) against one
    ``autograd.grad`` batched over the heads' cotangents (``is_grads_batched``), and half the heads
    per batched call; interleaved rounds, median of the per-round ratios to the loop."""
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build().train()
    shared = shared_parameters(model)
    x, y = _batches(shape, 1)[0]
    captured: list[Tensor] = []
    hook = model.heads[0].register_forward_pre_hook(lambda _m, args: captured.append(args[0]))

    def cotangents() -> tuple[Tensor, list[Tensor]]:
        """The head input of a fresh forward, and per head the gradient of its loss there."""
        captured.clear()
        model(x, 0)
        h = captured[0]
        cots = []
        for head in range(heads):
            leaf = h.detach().requires_grad_()
            loss = _head_loss(model.heads[head](leaf), y, head, heads - 1)
            cots.append(torch.autograd.grad(loss, leaf)[0])
        return h, cots

    def loop() -> None:
        h, cots = cotangents()
        for i, c in enumerate(cots):
            torch.autograd.grad(h, shared, c, retain_graph=i < heads - 1)

    def batched(per_call: int) -> Callable[[], None]:
        def run() -> None:
            h, cots = cotangents()
            for lo in range(0, heads, per_call):
                torch.autograd.grad(
                    h,
                    shared,
                    torch.stack(cots[lo : lo + per_call]),
                    retain_graph=lo + per_call < heads,
                    is_grads_batched=True,
                )

        return run

    impls = {
        "one autograd.grad per head": loop,
        f"batched, {heads} heads per call": batched(heads),
        f"batched, {heads // 2} heads per call": batched(heads // 2),
    }
    times: dict[str, list[float]] = {label: [] for label in impls}
    for fn in impls.values():
        fn()
    for _ in range(rounds):
        for label, fn in impls.items():
            start = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - start)
    hook.remove()
    base = times["one autograd.grad per head"]
    return [
        {
            "model": name,
            "threads": torch.get_num_threads(),
            "heads": heads,
            "impl": label,
            "seconds": statistics.median(t),
            "vs_loop": statistics.median(a / b for a, b in zip(t, base, strict=True)),
            "load_average": os.getloadavg()[0],
        }
        for label, t in times.items()
    ]


def environment(threads: list[int]) -> dict:
    return {
        "device": platform.processor() or "cpu",
        "threads": threads,
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "spg_fast": spg_fast.__version__,
        "python": platform.python_version(),
        "batch": BATCH,
        "heads": HEADS,
    }


def markdown(env: dict, passes: list[dict], stats: list[dict], backward: list[dict]) -> str:
    lines = [
        f"# End-of-task importance pass on {env['device']} ({env['date']})",
        "",
        f"torch {env['torch']}, {', '.join(map(str, env['threads']))} torch thread(s) on "
        f"{env['cpus']} CPUs (load average {env['load_average_at_start'][0]:.1f} at the start, "
        f"{env['load_average_at_end'][0]:.1f} at the end: the machine is shared), batch "
        f"{env['batch']}, dropout 0. Ratios are to the per-head passes with float32 statistics "
        "(the authors' procedure), per interleaved round, median over the rounds; seconds are "
        "medians; CPU: the same ratio of this process's CPU time; load is the 1-minute load "
        "average after each round (lowest-highest).",
        "",
        "| model | threads | k | configuration | s | vs authors | CPU | strategy | heads per group "
        "| load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in passes:
        lines.append(
            f"| {r['model']} | {r['threads']} | {r['k']} | {r['config']} | {r['seconds']:.3f} | "
            f"{r['vs_per_head_float32']:.2f}x | {r['cpu_vs_per_head_float32']:.2f}x | "
            f"{r['strategy']} | {r['group_size']} | "
            f"{min(r['load_averages']):.1f}-{max(r['load_averages']):.1f} |"
        )
    if stats:
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
    if backward:
        lines += [
            "",
            "## Backward through the shared part for several heads (one batch)",
            "",
            "| model | threads | heads | implementation | ms | vs one per head | load |",
            "|---|---|---|---|---|---|---|",
        ]
    for r in backward:
        lines.append(
            f"| {r['model']} | {r['threads']} | {r['heads']} | {r['impl']} | "
            f"{r['seconds'] * 1e3:.1f} | {r['vs_loop']:.2f}x | {r['load_average']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    today = datetime.date.today().isoformat()
    parser.add_argument(
        "--out", type=Path, default=Path(f"bench/results/cpu-2core-{today}-importance-pass")
    )
    parser.add_argument("--models", default="alexnet-flat,alexnet,mlp-flat,mlp")
    parser.add_argument("--ks", default="0,4,9,19")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--stats-repeats", type=int, default=15, help="0: no statistics table (default 15)"
    )
    parser.add_argument(
        "--backward-rounds", type=int, default=5, help="0: no backward table (default 5)"
    )
    parser.add_argument(
        "--configs",
        default=None,
        help="semicolon-separated configurations to time besides the authors' procedure "
        "(default: all)",
    )
    parser.add_argument(
        "--threads",
        default=None,
        help="comma-separated torch thread counts, each run in turn (default: torch's choice)",
    )
    args = parser.parse_args(argv)
    threads = _ints(args.threads) if args.threads else [torch.get_num_threads()]
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; valid: {', '.join(MODELS)}")
    only = [c for c in args.configs.split(";") if c] if args.configs else None
    if only is not None and not set(only) <= set(CONFIGS):
        parser.error(f"unknown configuration(s) in --configs; valid: {'; '.join(CONFIGS)}")
    ks = _ints(args.ks)
    if any(not 0 <= k < HEADS for k in ks):
        parser.error(f"--ks must lie in 0..{HEADS - 1}")
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment(threads)
    passes, backward = [], []
    for n in threads:
        torch.set_num_threads(n)
        for name in models:
            for i, k in enumerate(ks):
                print(f"{name}, k = {k}, {n} thread(s)", flush=True)
                passes += time_passes(name, k, args.batches, args.rounds, warm_up=i == 0, only=only)
            if args.backward_rounds:
                backward += time_backward(name, 10, args.backward_rounds)
    stats = [
        row
        for name in models
        if args.stats_repeats
        for row in time_statistics(name, args.stats_repeats)
    ]
    env["load_average_at_end"] = os.getloadavg()
    (args.out / "results.md").write_text(markdown(env, passes, stats, backward))
    (args.out / "results.json").write_text(
        json.dumps(
            {"environment": env, "passes": passes, "statistics": stats, "backward": backward},
            indent=1,
        )
    )
    for file, rows in (
        ("results.csv", passes),
        ("statistics.csv", stats),
        ("backward.csv", backward),
    ):
        if not rows:
            continue
        with (args.out / file).open("w", newline="") as f:
            writer = csv.DictWriter(
                f,
                fieldnames=[k for k in rows[0] if k not in ("all_seconds", "load_averages")],
                extrasaction="ignore",
            )
            writer.writeheader()
            writer.writerows(rows)
    print(markdown(env, passes, stats, backward))


if __name__ == "__main__":
    main()
