"""Host time of one optimizer step with every kernel launch stubbed out: what a step costs the CPU before the GPU
does any work, for spg-fast's fused SGD / AdamW and mask on the Triton path, beside torch's fused
SGD / AdamW over the same number of tensors (one-element tensors on the CPU, so torch's own
arithmetic is negligible too).

    python -m bench.host_overhead [--counts 96,161,954]
                                  [--out bench/results/<machine>-host-overhead]

161 is ResNet-50's number of parameter tensors. The Triton launchers run on CPU tensors under
Triton's interpreter (``TRITON_INTERPRET=1``, set here) with the launch itself replaced by a no-op,
so everything around it (launch plans, pointer tables, checks, dispatch) is timed and nothing else.
Writes ``host_overhead.{md,csv,json}``.
"""  # noqa: E501

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: the launchers accept CPU tensors

import torch
from torch import nn

import spg_fast
from spg_fast import SPG, optim

RESNET50_TENSORS = 161
KERNELS = [
    ("soft_mask", "_soft_mask"),
    ("sgd_step", "_sgd_step"),
    ("adam_step", "_adam_step"),
    ("adam_step", "_advance_steps"),
]


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid: object) -> Callable[..., None]:
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def launches_stubbed() -> Iterator[None]:
    import importlib

    saved = []
    for module_name, attr in KERNELS:
        module = importlib.import_module(f"spg_fast.kernels.triton.{module_name}")
        saved.append((module, attr, getattr(module, attr)))
        setattr(module, attr, _NoLaunch())
    try:
        yield
    finally:
        for module, attr, kernel in saved:
            setattr(module, attr, kernel)


class _Model(nn.Module):
    """``count`` one-element parameters, the last one a head."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.trunk = nn.ParameterList(nn.Parameter(torch.randn(1)) for _ in range(count - 1))
        self.heads = nn.ModuleList([nn.Linear(1, 1, bias=False)])


def _interleaved_medians(
    cases: dict[str, tuple[Callable[[], object], list[nn.Parameter]]], repeats: int
) -> dict[str, float]:
    """Median host time in microseconds of each case's ``step()``, each call after new gradients
    (untimed, as ``zero_grad()`` and backward give them), the cases interleaved call by call so
    that a change of load on the machine hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for i in range(repeats + 5):
        for name, (step, params) in cases.items():
            for p in params:
                p.grad = torch.empty_like(p).fill_(0.5)
            start = time.perf_counter()
            step()
            if i >= 5:  # the first calls build the plans
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e6 for name, t in times.items()}


def measure(count: int, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    model = _Model(count)
    spg = SPG(model, heads=model.heads, backend="triton")
    keep = {n: torch.rand_like(p) for n, p in spg.shared_parameters.items()}
    spg.load_state_dict({"format": 2, "tasks_finished": 1, "keep": keep})
    params = list(model.parameters())
    twin = [nn.Parameter(p.detach().clone()) for p in params]
    wrapped = spg.wrap(torch.optim.AdamW(params, lr=1e-3, fused=True))
    cases = {
        "spg_fast.optim.SGD(momentum=0.9)": (
            optim.SGD(params, lr=1e-3, momentum=0.9, spg=spg).step,
            params,
        ),
        "torch.optim.SGD(momentum=0.9, fused=True)": (
            torch.optim.SGD(twin, lr=1e-3, momentum=0.9, fused=True).step,
            twin,
        ),
        "spg_fast.optim.AdamW (update mask)": (optim.AdamW(params, lr=1e-3, spg=spg).step, params),
        "spg_fast.optim.AdamW (gradient mask)": (
            optim.AdamW(params, lr=1e-3, spg=spg, mask="gradient").step,
            params,
        ),
        "torch.optim.AdamW(fused=True)": (
            torch.optim.AdamW(twin, lr=1e-3, fused=True).step,
            twin,
        ),
        "spg.wrap(torch.optim.AdamW(fused=True)) (update mask)": (wrapped.step, params),
        "spg.mask_gradients()": (spg.mask_gradients, params),
    }
    with launches_stubbed():
        medians = _interleaved_medians(cases, repeats)
    rows = []
    for name, host in medians.items():
        rows.append(dict(tensors=count, step=name, host_us=host))
        print(f"{count:5d} tensors  {name:54} {host:9.1f} us", flush=True)
    return rows


def _markdown(rows: list[dict], env: dict) -> str:
    counts = sorted({r["tensors"] for r in rows})
    steps = list(dict.fromkeys(r["step"] for r in rows))
    by = {(r["tensors"], r["step"]): r["host_us"] for r in rows}
    lines = [
        f"Host time per step, launches stubbed out (median of {env['repeats']} interleaved calls, "
        f"microseconds); {env['cpu']}, torch {env['torch']}, triton {env['triton']}, "
        f"{env['threads']} threads, load average {env['load_before']} before and "
        f"{env['load_after']} after, {env['date']}.",
        "",
        "| step | " + " | ".join(f"{c} tensors" for c in counts) + " |",
        "|---|" + "---|" * len(counts),
    ]
    lines += [f"| {s} | " + " | ".join(f"{by[c, s]:.0f}" for c in counts) + " |" for s in steps]
    lines.append("")
    for step in steps:
        if step.startswith(("spg_fast.optim.AdamW", "spg.wrap")):
            base = "torch.optim.AdamW(fused=True)"
        elif step.startswith("spg_fast.optim.SGD"):
            base = "torch.optim.SGD(momentum=0.9, fused=True)"
        else:
            continue
        ratios = ", ".join(f"{by[c, step] / by[c, base]:.2f}x at {c}" for c in counts)
        lines.append(f"- {step} / {base}: {ratios}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--counts", default=f"96,{RESNET50_TENSORS},954", help="tensor counts (comma-separated)"
    )
    parser.add_argument("--repeats", type=int, default=200, help="timed steps per case")
    parser.add_argument("--out", type=Path, help="folder for host_overhead.{md,csv,json}")
    args = parser.parse_args(argv)
    import triton

    env = {
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "spg_fast": spg_fast.__version__,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "load_before": round(os.getloadavg()[0], 2),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    rows = [
        row for count in map(int, args.counts.split(",")) for row in measure(count, args.repeats)
    ]
    env["load_after"] = round(os.getloadavg()[0], 2)
    print(_markdown(rows, env))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "host_overhead.md").write_text(_markdown(rows, env))
        (args.out / "host_overhead.json").write_text(
            json.dumps({"environment": env, "rows": rows}, indent=1)
        )
        with open(args.out / "host_overhead.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
