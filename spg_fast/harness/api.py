"""The harness as a Python API: ``run`` one method on a task sequence, ``compare`` several over seeds."""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import spg_fast
from spg_fast.harness import report
from spg_fast.harness.metrics import summary
from spg_fast.harness.models import BACKBONES
from spg_fast.harness.sequences import TaskSequence, build_sequence
from spg_fast.harness.training import METHODS, Learner, TrainConfig, evaluate, model_factory, train_task


def default_backbone(seq: TaskSequence) -> str:
    """The MLP for vector data, the paper's conv net for images."""
    return "mlp" if len(seq.input_shape) == 1 else "alexnet"


def run(sequence: str | TaskSequence = "digits", method: str = "spg", *, backbone: str | None = None,
        seed: int = 0, device: str = "cpu", out: str | Path | None = None, data_dir: str | Path | None = None,
        config: TrainConfig | None = None, backend: str = "auto", progress: bool | None = None) -> dict[str, Any]:
    """Learn the tasks of ``sequence`` in order with ``method``; returns (and, with ``out``, writes) the results:
    the accuracy matrix, metrics, timings, the full config and the versions."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if backbone is not None and backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; valid: {', '.join(BACKBONES)}")
    cfg = config or TrainConfig()
    seq = sequence if isinstance(sequence, TaskSequence) else build_sequence(sequence, data_dir, seed)
    backbone = backbone or default_backbone(seq)
    dev = torch.device(device)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    learner = Learner(method, model_factory(backbone, seq, cfg.dropout), dev, backend)
    matrix: list[list[float]] = []
    train_s: list[float] = []
    importance_s: list[float] = []
    epochs: list[int] = []
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=len(seq.tasks), desc=f"{method} on {seq.name}", unit="task", disable=not show, leave=False)
    for task in range(len(seq.tasks)):
        model, optimizer = learner.start_task(task)
        start = time.perf_counter()
        def show_epoch(epoch: int, loss: float, acc: float, task: int = task) -> None:
            bar.set_postfix(task=task, epoch=epoch, val_loss=f"{loss:.3f}", val_acc=f"{acc:.3f}")

        epochs.append(train_task(model, optimizer, task, seq, cfg, dev, generator, show_epoch))
        train_s.append(time.perf_counter() - start)
        importance_s.append(learner.end_task(task, seq, cfg))
        matrix.append([evaluate(learner.model_for(j), j, seq.tasks[j].test, cfg.batch_size, dev)[1]
                       for j in range(task + 1)])
        bar.update()
    bar.close()
    test_sizes = [len(t.test) for t in seq.tasks]
    result = {
        "sequence": seq.name, "method": method, "acc_matrix": matrix, **summary(matrix, test_sizes),
        "tasks": [t.name for t in seq.tasks], "test_sizes": test_sizes, "epochs": epochs,
        "time_train_s": train_s, "time_importance_s": importance_s,
        "config": {"sequence": seq.name, "method": method, "backbone": backbone, "seed": seed, "device": str(dev),
                   "backend": learner.spg.backend if learner.spg else None, **asdict(cfg)},
        "versions": {"spg_fast": spg_fast.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
    }
    if out is not None:
        report.write_run(Path(out), result)
    return result


def compare(sequence: str = "digits", methods: tuple[str, ...] = METHODS, seeds: tuple[int, ...] = (0, 1, 2), *,
            out: str | Path | None = None, **kwargs: Any) -> dict[str, Any]:
    """``run`` every method with every seed on the same sequence; returns (and, with ``out``, writes) the runs and
    a per-method summary (mean and standard deviation over seeds)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; valid: {', '.join(METHODS)}")
    results = []
    for seed in seeds:
        for method in methods:
            sub = Path(out) / f"{method}-seed{seed}" if out is not None else None
            results.append(run(sequence, method, seed=seed, out=sub, **kwargs))
    rows = report.aggregate(results)
    if out is not None:
        report.write_comparison(Path(out), results[0]["sequence"], results, rows)
    return {"sequence": results[0]["sequence"], "runs": results, "summary": rows}
