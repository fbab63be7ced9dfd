"""Measure every op and implementation at every size in one call; write a markdown table, a CSV and plots.

    python -m bench.run --out bench/results/<device>-<date> [--sizes 1e5,1e6,1e7]
                        [--models resnet50] [--ops mask,sgd_momentum_masked,adamw_masked,importance]
                        [--no-compile] [--e2e]

Each measurement is reported as time, GB/s by the bytes model (bench/bytes_model.py) and as a
fraction of the device's streaming bandwidth (a copy on a GPU, an in-place triad on the CPU), which
is measured first.
"""  # noqa: E501

from __future__ import annotations

import argparse
import csv
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import spg_fast
from bench import bytes_model
from bench.ops import BYTES_OP, IMPLEMENTATIONS, MODEL_SHAPES, make_problem, synthetic_shapes
from bench.timing import copies_to_rotate, median_seconds, stream_bandwidth
from spg_fast._backend import resolve_backend


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def _environment(device: torch.device, bandwidth: float, ceiling: str) -> dict:
    import triton

    return {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "device_type": device.type,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "spg_fast": spg_fast.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "stream_bandwidth_GBps": bandwidth / 1e9,
        "stream_bandwidth_measured_by": ceiling,
        "spg_fast_optim_steps": _step_path(device),
    }


def _step_path(device: torch.device) -> str:
    """Which implementation spg_fast.optim steps with on this device
    (spg_fast._backend.Ops.step_kernels)."""
    ops = resolve_backend("auto", [("p", torch.zeros(1, device=device))])
    kernels = ops.step_kernels([torch.zeros(1, device=device)], [])
    return kernels.sgd.__module__ if kernels is not None else "SPG's mask around torch's fused step"


def measure(
    op: str,
    impls: list[str],
    shapes: list[tuple[int, ...]],
    label: str,
    dtype: torch.dtype,
    device: torch.device,
    bandwidth: float,
    rounds: int = 7,
) -> list[dict]:
    """One row per implementation. When all implementations' inputs fit in memory together they are
    timed in interleaved rounds (median of round medians), so that drift of the machine falls on
    each alike; otherwise one after the other. Implementations whose inputs do not fit are skipped
    (not in the rows)."""
    numel = sum(torch.Size(s).numel() for s in shapes)
    if device.type == "cuda":
        # blocks the caching allocator kept from the previous problem count as free
        torch.cuda.empty_cache()
    per_element = bytes_model.bytes_per_element(BYTES_OP[op], torch.finfo(dtype).bits // 8)
    working_set = numel * (per_element + 8)  # plus the spg-fast state and torch's keep factors
    budget = int(0.5 * _free_bytes(device))
    if working_set > budget:
        return []
    copies = copies_to_rotate(working_set, device, budget // max(1, len(impls)))
    together = working_set * copies * len(impls) <= budget
    times: dict[str, list[float]] = {impl: [] for impl in impls}

    def build(impl: str) -> list:
        return [
            IMPLEMENTATIONS[op][impl](make_problem(shapes, dtype, device)) for _ in range(copies)
        ]

    if together:
        steps = {impl: build(impl) for impl in impls}
        for _ in range(rounds):
            for impl in impls:
                times[impl].append(
                    median_seconds(steps[impl], device, min_repeats=5, min_time=0.05)
                )
        del steps
    else:
        for impl in impls:
            steps = build(impl)
            times[impl].append(median_seconds(steps, device))
            del steps
    rows = []
    for impl in impls:
        seconds = statistics.median(times[impl])
        gbps = numel * per_element / seconds / 1e9
        rows.append(
            {
                "op": op,
                "impl": impl,
                "problem": label,
                "params": numel,
                "tensors": len(shapes),
                "dtype": str(dtype).removeprefix("torch."),
                "seconds": seconds,
                "min_bytes": numel * per_element,
                "GBps": gbps,
                "fraction_of_stream": gbps * 1e9 / bandwidth,
                "interleaved": together,
            }
        )
    return rows


def end_to_end(device: torch.device) -> list[dict]:
    """One training step with and without SPG, and one end-of-task importance pass, on the harness's
    conv net (CIFAR-shaped input, batch 64; ResNet-50 when torchvision is installed)."""
    import torch.nn.functional as F

    from spg_fast.harness.models import alexnet

    try:
        import torchvision

        model_name = "resnet50"
        net = torchvision.models.resnet50(num_classes=10)
        model = torch.nn.ModuleDict({"trunk": net}).to(device)
        forward = lambda x, t: model["trunk"](x)  # noqa: E731
        heads = "trunk.fc"
        x = torch.randn(64, 3, 224, 224, device=device)
    except ImportError:
        model_name = "alexnet-like (harness), 3x32x32"
        model = alexnet((3, 32, 32), [10] * 5).to(device)
        forward = model
        heads = model.heads
        x = torch.randn(64, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (64,), device=device)
    steps = {}
    for name, mode in (
        ("no SPG", None),
        ("spg.wrap(SGD)", "wrap"),
        ("spg_fast.optim.SGD", "fused"),
    ):
        spg = spg_fast.SPG(model, heads=heads)
        spg.end_task(0, [(x, y)], forward)
        if mode == "fused":
            opt = spg_fast.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, spg=spg)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
            opt = spg.wrap(opt) if mode == "wrap" else opt

        def step(opt=opt) -> None:
            opt.zero_grad()
            F.cross_entropy(forward(x, 0), y).backward()
            opt.step()

        steps[name] = step
    # Interleaved rounds, so that warm-up and drift of the machine fall on every
    # configuration alike.
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(15):
        for name, step in steps.items():
            times[name].append(median_seconds([step], device, min_repeats=1, min_time=0.0))
    rows = [
        {"model": model_name, "what": f"training step, {name}", "seconds": statistics.median(t[3:])}
        for name, t in times.items()
    ]
    spg = spg_fast.SPG(model, heads=heads)
    batches = [(x, y)] * 10
    start = time.perf_counter()
    spg.end_task(0, batches, forward)
    if device.type == "cuda":
        torch.cuda.synchronize()
    rows.append(
        {
            "model": model_name,
            "what": "importance pass, 1 head x 10 batches of 64",
            "seconds": time.perf_counter() - start,
        }
    )
    base = rows[0]["seconds"]
    for r in rows[1:3]:
        r["overhead_vs_no_spg"] = r["seconds"] / base - 1
    return rows


def plots(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for op in dict.fromkeys(r["op"] for r in rows):
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
        for impl in dict.fromkeys(r["impl"] for r in rows if r["op"] == op):
            pts = sorted(
                (r["params"], r["seconds"], r["GBps"])
                for r in rows
                if r["op"] == op and r["impl"] == impl and r["problem"].startswith("synthetic")
            )
            if pts:
                ax1.plot([p[0] for p in pts], [p[1] * 1e3 for p in pts], marker="o", label=impl)
                ax2.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=impl)
        ax1.set(
            xscale="log",
            yscale="log",
            xlabel="parameters",
            ylabel="ms per call",
            title=f"{op}: time",
        )
        ax2.set(
            xscale="log", xlabel="parameters", ylabel="GB/s (bytes model)", title=f"{op}: bandwidth"
        )
        ax1.legend(fontsize=8)
        ax2.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"{op}.png", dpi=100)
        plt.close(fig)


def markdown(env: dict, rows: list[dict], e2e: list[dict]) -> str:
    lines = [
        f"# spg-fast benchmarks on {env['device']} ({env['date']})",
        "",
        f"torch {env['torch']}, triton {env['triton']}, spg-fast {env['spg_fast']}, "
        f"{env['threads']} threads. Measured streaming bandwidth: "
        f"{env['stream_bandwidth_GBps']:.1f} GB/s (read + write; "
        f"{env['stream_bandwidth_measured_by']}).",
        "",
        "Bytes model (fewest bytes per parameter element):",
        "",
        bytes_model.table(),
        "",
    ]
    for op in dict.fromkeys(r["op"] for r in rows):
        lines += [
            f"## {op}",
            "",
            "| problem | params | impl | ms | GB/s | of stream BW |",
            "|---|---|---|---|---|---|",
        ]
        for r in (r for r in rows if r["op"] == op):
            lines.append(
                f"| {r['problem']} | {r['params']:.3g} | {r['impl']} | {r['seconds'] * 1e3:.3f} | "
                f"{r['GBps']:.1f} | {r['fraction_of_stream']:.0%} |"
            )
        lines.append("")
    if e2e:
        lines += [
            "## End to end",
            "",
            "| model | what | ms | overhead vs no SPG |",
            "|---|---|---|---|",
        ]
        for r in e2e:
            over = f"{r['overhead_vs_no_spg']:+.1%}" if "overhead_vs_no_spg" in r else ""
            lines.append(f"| {r['model']} | {r['what']} | {r['seconds'] * 1e3:.1f} | {over} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--sizes", help="synthetic model sizes (default 1e5..1e9 on a GPU, 1e5..1e7 on the CPU)"
    )
    parser.add_argument(
        "--models", default="resnet50,transformer-1b", help=f"of {', '.join(MODEL_SHAPES)}"
    )
    parser.add_argument("--ops", default=",".join(IMPLEMENTATIONS))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--no-compile", action="store_true", help="skip the torch.compile competitors"
    )
    parser.add_argument(
        "--e2e", action="store_true", help="also time training steps and an importance pass"
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    args.out.mkdir(parents=True, exist_ok=True)
    bandwidth, ceiling = stream_bandwidth(device, 1 << 30 if device.type == "cuda" else 1 << 28)
    env = _environment(device, bandwidth, ceiling)
    print(
        f"{env['device']}: streaming bandwidth {env['stream_bandwidth_GBps']:.1f} GB/s ({ceiling})",
        flush=True,
    )
    default_sizes = "1e5,1e6,1e7,1e8,1e9" if device.type == "cuda" else "1e5,1e6,1e7"
    problems = [
        (f"synthetic {float(s):.0e}", synthetic_shapes(int(float(s))))
        for s in (args.sizes or default_sizes).split(",")
    ]
    problems += [(name, MODEL_SHAPES[name]()) for name in args.models.split(",") if name]
    rows = []
    for op in args.ops.split(","):
        impls = [i for i in IMPLEMENTATIONS[op] if not (args.no_compile and "compile" in i)]
        for label, shapes in problems:
            measured = measure(op, impls, shapes, label, dtype, device, bandwidth)
            if not measured:
                print(f"{op:20} {label:18} skipped (memory)", flush=True)
            for row in measured:
                print(
                    f"{op:20} {label:18} {row['impl']:28} {row['seconds'] * 1e3:9.3f} ms "
                    f"{row['GBps']:7.1f} GB/s",
                    flush=True,
                )
            rows += measured
    e2e = end_to_end(device) if args.e2e else []
    with open(args.out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (args.out / "environment.json").write_text(
        json.dumps({**env, "end_to_end": e2e}, indent=2) + "\n"
    )
    (args.out / "results.md").write_text(markdown(env, rows, e2e))
    plots(rows, args.out)
    print(f"wrote {args.out}/", file=sys.stderr)


if __name__ == "__main__":
    main()
