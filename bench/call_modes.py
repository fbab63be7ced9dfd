"""One optimizer step timed the ways a training loop experiences it, side by side with torch's fused
AdamW and ``torch._foreach_mul_`` (the unfused mask), on a CUDA GPU.

    python -m bench.call_modes [--sizes 1e8,1e9] [--tensors 1,954] [--out bench/results/<dir>]

Per case, five times: ``sync``, one call then ``torch.cuda.synchronize()`` (host and kernels in
series: what a loop that reads a value every step sees); ``pipelined``, ten calls back to back, then
one synchronisation, per call (the host work overlaps the kernels, as in training); ``gpu``, the
kernels alone: the calls are queued behind a GPU spin (``torch.cuda._sleep``) long enough to hide
the host, and CUDA events around them time only the kernels; ``host``, the wall time of a call
queued behind the spin (the host's share, the kernels not waited for); ``graph``, the step captured
in a CUDA graph and replayed. Every step is timed in a real loop's state: the gradients are replaced
by new tensors before each call, as ``zero_grad()`` and backward replace them (except in graph
replay, whose tensors stay put by construction). Fractions are of the device-to-device copy
bandwidth, by the bytes model of ``bench.steps.stream_bytes``. Writes ``call_modes.{md,json}``.
Without a GPU it says so and exits: the CPU's numbers are ``bench.steps`` (per call) and
``bench.host_overhead`` (host alone).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.steps import stream_bytes
from spg_fast import SPG, optim

REPEATS = 10


class _Case:
    """One step over parameters split into ``count`` tensors of ``numel`` elements in all."""

    def __init__(self, kind: str, numel: int, count: int, device: torch.device) -> None:
        torch.manual_seed(0)
        sizes = [numel // count + (1 if i < numel % count else 0) for i in range(count)]
        self.params = [torch.nn.Parameter(torch.randn(n, device=device)) for n in sizes]
        self.head = torch.nn.Parameter(torch.randn(16, device=device))
        module = torch.nn.Module()
        module.trunk = torch.nn.ParameterList(self.params)
        module.head = torch.nn.ParameterList([self.head])
        self.all = [*self.params, self.head]
        self.kind = kind
        spg = SPG(module, heads="head")
        keep = {n: torch.rand_like(p) for n, p in spg.shared_parameters.items()}
        spg.load_state_dict({"format": 2, "tasks_finished": 1, "keep": keep})
        self.keeps = list(spg.keep_factors.values())
        self.step = self._make(kind, spg)
        self.new_grads()

    def _make(self, kind: str, spg: SPG) -> Callable[[], Any]:
        if kind == "torch AdamW fused":  # capturable: torch's condition for graph capture
            return torch.optim.AdamW(self.all, lr=1e-3, fused=True, capturable=True).step
        if kind == "torch _foreach_mul_":
            return lambda: torch._foreach_mul_([p.grad for p in self.params], self.keeps)
        if kind == "spg.mask_gradients":
            return spg.mask_gradients
        mask = "gradient" if "gradient" in kind else "update"
        if kind.startswith("spg_fast.optim.SGD"):
            return optim.SGD(self.all, lr=1e-3, momentum=0.9, spg=spg, mask=mask).step
        return optim.AdamW(self.all, lr=1e-3, spg=spg, mask=mask).step

    def new_grads(self) -> None:
        for p in self.all:
            p.grad = torch.full_like(p, 1e-3)


CASES = (
    "torch AdamW fused",
    "spg_fast.optim.AdamW (update mask)",
    "spg_fast.optim.AdamW (gradient mask)",
    "spg_fast.optim.SGD (gradient mask)",
    "spg.mask_gradients",
    "torch _foreach_mul_",
)


def _bytes(kind: str) -> int:
    if kind == "torch AdamW fused":
        return stream_bytes("adamw", None, False)
    if "AdamW" in kind:
        return stream_bytes("adamw", 4, False)
    if "SGD" in kind:
        return stream_bytes("sgd", 4, False)
    return 3 * 4  # the mask: read g and keep, write g


def _events() -> tuple[torch.cuda.Event, torch.cuda.Event]:
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


def _measure(case: _Case) -> dict[str, float]:
    sync, pipelined, gpu, host = [], [], [], []
    for _ in range(5):
        case.new_grads()
        torch.cuda.synchronize()
        start, end = _events()
        start.record()
        case.step()
        end.record()
        torch.cuda.synchronize()
        sync.append(start.elapsed_time(end))
        start.record()
        for _ in range(REPEATS):
            case.new_grads()
            case.step()
        end.record()
        torch.cuda.synchronize()
        pipelined.append(start.elapsed_time(end) / REPEATS)
        case.new_grads()
        torch.cuda._sleep(int(2e8))  # hides the host behind the GPU
        start.record()
        wall = time.perf_counter()
        case.step()
        host.append((time.perf_counter() - wall) * 1e3)
        end.record()
        torch.cuda.synchronize()
        gpu.append(start.elapsed_time(end))
    graph = torch.cuda.CUDAGraph()
    case.step()  # once before capture: plans built, state created
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        case.step()
    replays = []
    for _ in range(5):
        start, end = _events()
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        replays.append(start.elapsed_time(end))
    median = statistics.median
    return {
        "sync_ms": median(sync),
        "pipelined_ms": median(pipelined),
        "gpu_ms": median(gpu),
        "host_ms": median(host),
        "graph_ms": median(replays),
    }


def _copy_bandwidth(numel: int) -> float:
    a = torch.empty(numel, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    start, end = _events()
    start.record()
    for _ in range(REPEATS):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    return 8 * numel * REPEATS / (start.elapsed_time(end) / 1e3)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.call_modes", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--sizes", default="1e8,1e9", help="parameters, comma-separated")
    parser.add_argument("--tensors", default="1,954", help="how many tensors, comma-separated")
    parser.add_argument("--out", type=Path, help="folder for call_modes.{md,json}")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "bench.call_modes needs a CUDA GPU; on the CPU see bench.steps and bench.host_overhead"
        )
        return []
    device = torch.device("cuda")
    rows = []
    for numel in (int(float(s)) for s in args.sizes.split(",")):
        bandwidth = _copy_bandwidth(numel)
        for count in (int(c) for c in args.tensors.split(",")):
            for kind in CASES:
                case = _Case(kind, numel, count, device)
                times = _measure(case)
                nbytes = _bytes(kind) * numel
                row = {"case": kind, "numel": numel, "tensors": count, **times}
                for mode in ("sync", "pipelined", "gpu", "graph"):
                    row[f"{mode}_of_copy"] = nbytes / (times[f"{mode}_ms"] / 1e3) / bandwidth
                rows.append(row)
                print(json.dumps(row), flush=True)
                del case
                torch.cuda.empty_cache()
    env = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "-m", "bench.call_modes", *(argv or sys.argv[1:])]),
    }
    lines = [
        f"{env['gpu']}, torch {env['torch']}, {env['date']}; ms per step and fraction of copy "
        "bandwidth.",
        "",
        "| case | params | tensors | sync | pipelined | GPU only | host | graph |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['case']} | {r['numel']:.0e} | {r['tensors']} | {r['sync_ms']:.3f} "
        f"({r['sync_of_copy']:.0%}) | {r['pipelined_ms']:.3f} ({r['pipelined_of_copy']:.0%}) "
        f"| {r['gpu_ms']:.3f} ({r['gpu_of_copy']:.0%}) | {r['host_ms']:.3f} "
        f"| {r['graph_ms']:.3f} ({r['graph_of_copy']:.0%}) |"
        for r in rows
    ]
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "call_modes.md").write_text("\n".join(lines) + "\n")
        (args.out / "call_modes.json").write_text(json.dumps({"environment": env, "rows": rows}))
    return rows


if __name__ == "__main__":
    main()
