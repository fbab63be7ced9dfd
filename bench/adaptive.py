"""SPG's protection of earlier tasks under SGD, SGD-momentum, Adam and AdamW, per mask mode.

Through SPG's default (``spg.wrap(opt)``, ``mask="auto"``), each mask mode forced
(``mask="gradient"``, the paper's rule; ``mask="update"``) and the fused optimizers
(``spg_fast.optim``), against fine-tuning.

    python -m bench.adaptive --out bench/results/<machine>-adaptive
        [--sequences digits,digits-permuted] [--seeds 0,1,2] [--epochs 20]
        [--optimizers sgd:0.1,sgd-momentum:0.01,adam:1e-3,adamw:1e-3]

Every task is trained for a fixed number of epochs at a fixed learning rate with a fresh optimizer
(as the authors' code does per task), no early stopping and no weight restoring, so the optimizers
differ only in their update. The harness's MLP with one head per task; the test accuracy of every
task seen so far after each task gives the accuracy matrix, from which ``spg_fast.harness.metrics``
computes ACC, forgetting and BWT. The same seed gives every optimizer and method the same data
split, class order, initial weights and batch order (paired runs). Writes ``results.{md,csv,json}``
(the environment and the exact configuration in the JSON) after every run.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import spg_fast
from spg_fast import SPG, optim
from spg_fast.harness.config import TrainConfig
from spg_fast.harness.metrics import summary
from spg_fast.harness.models import build_model
from spg_fast.harness.sequences import TaskSequence, build_sequence
from spg_fast.harness.training import Inputs, evaluate

Step = Callable[[], None]

OPTIMIZERS: dict[str, Callable[[Any, float], torch.optim.Optimizer]] = {
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr),
    "sgd-momentum": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
    "adamw": lambda params, lr: torch.optim.AdamW(
        params, lr=lr
    ),  # torch's default weight decay 0.01
}
STORAGE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "uint8": torch.uint8}
# SGD's and SGD-momentum's rates are the harness's quick-protocol ones
# (spg_fast.harness.protocol.QUICK_LR); 1e-3 is Adam's usual rate.
DEFAULT_OPTIMIZERS = "sgd:0.1,sgd-momentum:0.01,adam:1e-3,adamw:1e-3"
METRICS = ("acc", "forgetting", "bwt")


FUSED: dict[str, Callable[[Any, float, SPG], torch.optim.Optimizer]] = {
    "sgd": lambda params, lr, spg: optim.SGD(params, lr=lr, spg=spg),
    "sgd-momentum": lambda params, lr, spg: optim.SGD(params, lr=lr, momentum=0.9, spg=spg),
    "adam": lambda params, lr, spg: optim.Adam(params, lr=lr, spg=spg),
    "adamw": lambda params, lr, spg: optim.AdamW(params, lr=lr, spg=spg),
}


def _step(method: str, spg: SPG | None, name: str, params: Any, lr: float) -> Step:
    """One training step of ``method`` with a fresh optimizer ``name`` over ``params``."""
    if method == "spg-fused":
        return FUSED[name](params, lr, spg).step
    optimizer = OPTIMIZERS[name](params, lr)
    if method == "finetune":
        return optimizer.step
    return spg.wrap(optimizer, mask=METHODS[method]).step


# Method -> SPG's mask mode through spg.wrap (None: no SPG, or the fused optimizer's default).
METHODS: dict[str, str | None] = {
    "finetune": None,
    "spg": "auto",
    "spg-gradient": "gradient",
    "spg-update": "update",
    "spg-fused": None,
}


@dataclass(frozen=True)
class Config:
    """One invocation's experiment: every (sequence, seed, optimizer, method) combination is
    a run."""

    sequences: tuple[str, ...]
    optimizers: tuple[tuple[str, float], ...]
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    epochs: int
    batch_size: int
    tasks: int | None  # the first this many tasks of each sequence (None: all)
    backbone: str = "mlp"
    threads: int = 1
    importance_dtype: str = "float32"  # SPG's storage of the keep factors (spg_fast.storage)


def run_one(
    seq: TaskSequence, optimizer: str, lr: float, method: str, seed: int, cfg: Config
) -> dict[str, Any]:
    """Learn ``seq``'s first ``cfg.tasks`` tasks in order; the accuracy matrix and its metrics."""
    tasks = seq.tasks[: cfg.tasks]
    torch.manual_seed(seed)
    model = build_model(cfg.backbone, seq.input_shape, [t.n_classes for t in seq.tasks])
    generator = torch.Generator().manual_seed(seed)
    inputs = Inputs(seq, TrainConfig(batch_size=cfg.batch_size), torch.device("cpu"))
    storage = STORAGE[cfg.importance_dtype]
    spg = SPG(model, heads=model.heads, importance_dtype=storage) if method != "finetune" else None
    matrix: list[list[float]] = []
    for task, data in enumerate(tasks):
        step = _step(method, spg, optimizer, model.parameters(), lr)
        for _ in range(cfg.epochs):
            model.train()
            for x, y in inputs.batches(
                data.train, cfg.batch_size, torch.randperm(len(data.train), generator=generator)
            ):
                model.zero_grad(set_to_none=True)
                F.cross_entropy(model(x, task), y).backward()
                step()
        if spg is not None:
            spg.end_task(task, list(inputs.batches(data.train, cfg.batch_size)))
        matrix.append([evaluate(model, j, tasks[j].test, inputs)[1] for j in range(task + 1)])
    return {"acc_matrix": matrix, **summary(matrix, [len(t.test) for t in tasks])}


def _spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample standard deviation over seeds of each (sequence, optimizer, lr,
    method), and the mean of the paired per-seed difference in forgetting from fine-tuning
    with the same optimizer."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["sequence"], r["optimizer"], r["lr"], r["method"]), []).append(r)
    out = []
    for (sequence, optimizer, lr, method), runs in groups.items():
        entry: dict[str, Any] = {
            "sequence": sequence,
            "optimizer": optimizer,
            "lr": lr,
            "method": method,
            "seeds": len(runs),
        }
        for m in METRICS:
            entry[m], entry[f"{m}_std"] = _spread([r[m] for r in runs])
        base = {
            r["seed"]: r["forgetting"]
            for r in groups.get((sequence, optimizer, lr, "finetune"), [])
        }
        paired = [r["forgetting"] - base[r["seed"]] for r in runs if r["seed"] in base]
        entry["forgetting_vs_finetune"], entry["forgetting_vs_finetune_std"] = (
            _spread(paired) if paired and method != "finetune" else (None, None)
        )
        out.append(entry)
    return out


def _markdown(
    summary_rows: list[dict[str, Any]], cfg: Config, env: dict[str, Any], partial: str
) -> str:
    def cell(row: dict[str, Any], key: str) -> str:
        return (
            ""
            if row[key] is None
            else f"{row[key]:+.3f} ± {row[f'{key}_std']:.3f}"
            if key.startswith(("bwt", "forgetting_vs"))
            else f"{row[key]:.3f} ± {row[f'{key}_std']:.3f}"
        )

    lines = [
        f"# SPG under SGD, SGD-momentum, Adam and AdamW{partial}",
        "",
        f"{cfg.backbone} with one head per task, SPG's keep factors stored as "
        f"{cfg.importance_dtype}; {cfg.epochs} epochs per task at a fixed learning "
        f"rate, batch {cfg.batch_size}, a fresh optimizer per task; seeds "
        f"{', '.join(map(str, cfg.seeds))}"
        f"{'' if cfg.tasks is None else f'; first {cfg.tasks} tasks'}. Mean ± sample standard "
        "deviation over seeds. Forgetting vs fine-tuning: the per-seed difference from fine-tuning "
        "with the same optimizer (same data, initial weights and batch order), averaged.",
        "",
        f"{env['cpu']}, {env['threads']} thread(s), torch {env['torch']}, spg_fast "
        f"{env['spg_fast']} (git {env['git']}), {env['date']}.",
        "",
        LEGEND,
        "",
    ]
    for sequence in dict.fromkeys(r["sequence"] for r in summary_rows):
        lines += [
            f"## {sequence}",
            "",
            "| optimizer | lr | method | ACC | forgetting | BWT | forgetting vs fine-tuning |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['optimizer']} | {r['lr']:g} | {r['method']} | {cell(r, 'acc')} "
            f"| {cell(r, 'forgetting')} | {cell(r, 'bwt')} | {cell(r, 'forgetting_vs_finetune')} |"
            for r in summary_rows
            if r["sequence"] == sequence
        ]
        lines.append("")
    return "\n".join(lines)


LEGEND = (
    'Methods: finetune, no protection; spg, `spg.wrap(opt)` (the default, `mask="auto"`: the '
    "gradient mask under SGD without weight decay, the update mask otherwise); spg-gradient, "
    '`spg.wrap(opt, mask="gradient")` (the paper\'s rule); spg-update, '
    '`spg.wrap(opt, mask="update")`; spg-fused, `spg_fast.optim`\'s optimizer of the same kind '
    "with its default mask. Optimizers: torch's defaults except: sgd-momentum momentum 0.9; adam "
    "no weight decay; adamw weight decay 0.01 (every setting in results.json, "
    "optimizer_settings)."
)


CSV_FIELDS = (
    "sequence",
    "optimizer",
    "lr",
    "method",
    "seed",
    "acc",
    "forgetting",
    "bwt",
    "acc_weighted",
    "forgetting_weighted",
    "bwt_weighted",
    "seconds",
)


def write(
    out: Path, rows: list[dict[str, Any]], cfg: Config, env: dict[str, Any], planned: int
) -> None:
    """results.md, results.csv (one row per run) and results.json (environment, config,
    runs, summary)."""
    summary_rows = aggregate(rows)
    partial = "" if len(rows) == planned else f" (partial: {len(rows)} of {planned} runs)"
    (out / "results.md").write_text(_markdown(summary_rows, cfg, env, partial))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.json").write_text(
        json.dumps(
            {
                "environment": env,
                "config": asdict(cfg),
                "optimizer_settings": optimizer_settings(cfg),
                "planned_runs": planned,
                "runs": rows,
                "summary": summary_rows,
            },
            indent=1,
            default=str,
        )
    )


def optimizer_settings(cfg: Config) -> dict[str, dict[str, Any]]:
    """Every setting of each optimizer as torch constructs it (momentum, betas, weight
    decay, ...)."""
    probe = [torch.nn.Parameter(torch.zeros(1))]
    return {f"{name}:{lr:g}": OPTIMIZERS[name](probe, lr).defaults for name, lr in cfg.optimizers}


def environment(threads: int, argv: list[str]) -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    try:
        git = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        git = "unknown"
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "spg_fast": spg_fast.__version__,
        "spg_backend": SPG(torch.nn.Linear(1, 1)).backend,
        "git": git,
        "command": " ".join(["python", "-m", "bench.adaptive", *argv]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _unique(values: tuple[Any, ...]) -> tuple[Any, ...]:
    repeated = sorted({str(v) for v in values if values.count(v) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"{', '.join(repeated)} given more than once")
    return values


def _optimizers(text: str) -> tuple[tuple[str, float], ...]:
    pairs = []
    for item in text.split(","):
        name, _, lr = item.partition(":")
        if name not in OPTIMIZERS:
            raise argparse.ArgumentTypeError(
                f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}"
            )
        try:
            rate = float(lr)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{item!r}: give name:learning_rate, e.g. adam:1e-3"
            ) from None
        if not (math.isfinite(rate) and rate > 0):
            raise argparse.ArgumentTypeError(
                f"{item!r}: the learning rate must be a finite number > 0"
            )
        pairs.append((name, rate))
    return _unique(tuple(pairs))


def _choices(valid: Any) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(text.split(","))
        bad = [n for n in names if n not in valid]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad)}; valid: {', '.join(valid)}")
        return _unique(names)

    return parse


def _seeds(text: str) -> tuple[int, ...]:
    if not all(v.isdigit() for v in text.split(",")):
        raise argparse.ArgumentTypeError(f"give integers >= 0, comma-separated, got {text!r}")
    return _unique(tuple(int(v) for v in text.split(",")))


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.adaptive", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for results.{md,csv,json}")
    parser.add_argument(
        "--sequences",
        type=_choices(("digits", "digits-permuted", "fashion-mnist")),
        default=("digits",),
        help="digits, digits-permuted (embedded) or fashion-mnist (Debian's dataset-fashion-mnist "
        "or ./data), comma-separated (default: digits)",
    )
    parser.add_argument(
        "--optimizers",
        type=_optimizers,
        default=_optimizers(DEFAULT_OPTIMIZERS),
        help=f"name:lr pairs, comma-separated (default: {DEFAULT_OPTIMIZERS})",
    )
    parser.add_argument(
        "--methods",
        type=_choices(METHODS),
        default=tuple(METHODS),
        help=f"comma-separated (default: {','.join(METHODS)})",
    )
    parser.add_argument(
        "--seeds", type=_seeds, default=(0, 1, 2), help="comma-separated (default: 0,1,2)"
    )
    parser.add_argument("--epochs", type=_positive, default=20, help="epochs per task")
    parser.add_argument("--batch-size", type=_positive, default=64)
    parser.add_argument(
        "--tasks", type=_positive, help="only the first this many tasks of each sequence"
    )
    parser.add_argument(
        "--threads", type=_positive, default=1, help="torch threads (the models are tiny)"
    )
    parser.add_argument(
        "--importance-dtype",
        choices=list(STORAGE),
        default="float32",
        help="how SPG stores its keep factors (default float32)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if (args.out / "results.json").exists() and not args.overwrite:
        parser.error(f"--out {args.out} already holds results.json; pass --overwrite to replace it")
    cfg = Config(
        args.sequences,
        args.optimizers,
        args.methods,
        args.seeds,
        args.epochs,
        args.batch_size,
        args.tasks,
        threads=args.threads,
        importance_dtype=args.importance_dtype,
    )
    torch.set_num_threads(cfg.threads)
    env = environment(cfg.threads, argv)
    args.out.mkdir(parents=True, exist_ok=True)
    pairs = [(o, lr, m) for o, lr in cfg.optimizers for m in cfg.methods]
    planned = len(cfg.sequences) * len(cfg.seeds) * len(pairs)
    rows: list[dict[str, Any]] = []
    for sequence in cfg.sequences:
        for seed in cfg.seeds:
            seq = build_sequence(sequence, seed=seed)
            for optimizer, lr, method in pairs:
                start = time.perf_counter()
                result = run_one(seq, optimizer, lr, method, seed, cfg)
                rows.append(
                    {
                        "sequence": sequence,
                        "optimizer": optimizer,
                        "lr": lr,
                        "method": method,
                        "seed": seed,
                        **result,
                        "seconds": time.perf_counter() - start,
                    }
                )
                print(
                    f"[{len(rows)}/{planned}] {sequence} seed {seed} {optimizer} lr {lr:g} "
                    f"{method:13} ACC {result['acc']:.3f} forgetting {result['forgetting']:.3f} "
                    f"BWT {result['bwt']:+.3f} ({rows[-1]['seconds']:.1f} s)",
                    flush=True,
                )
                write(args.out, rows, cfg, env, planned)
    print((args.out / "results.md").read_text())
    return rows


if __name__ == "__main__":
    main()
