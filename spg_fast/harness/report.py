"""Readable and machine-readable outputs of runs: text tables, JSON, CSV and PNG plots."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from spg_fast.harness.outputs import write_atomic
from spg_fast.harness.progress import usage_text


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, imported when a plot is drawn: importing it
    takes 0.4 s, which every process of a run under torchrun would pay, although only
    rank 0 draws."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def matrix_table(matrix: list[list[float]]) -> str:
    """The accuracy matrix as text: row i = after task i, column j = task j."""
    t = len(matrix)
    lines = ["after \\ on " + " ".join(f"{j:>6}" for j in range(t))]
    for i, row in enumerate(matrix):
        lines.append(f"task {i:<6}" + " ".join(f"{v:6.3f}" for v in row))
    return "\n".join(lines)


def _number(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def divergence_text(result: dict[str, Any]) -> str:
    """One line on why a run counts as diverged ("" when it did not)."""
    d = result.get("divergence")
    if not d:
        return ""
    where = f"task {d['task']}" + (f" epoch {d['epoch']}" if d["epoch"] is not None else "")
    return f"diverged in {where}: {d['why']}"


def summary_table(result: dict[str, Any]) -> str:
    """The run's metrics (and capacity used after the last task, and divergence) as text."""
    head = f"{result['method']} on {result['sequence']} (seed {result['config']['seed']})"
    lines = [head, "  ".join(f"{k} {_number(result[k])}" for k in METRICS)]
    usage = [u for u in result.get("importance_usage", []) if u is not None]
    if usage:
        lines.append("capacity after the last task:" + usage_text(usage[-1]).removeprefix(";"))
    if result.get("diverged"):
        lines.append("DIVERGED: " + divergence_text(result))
    return "\n".join(lines)


def _csv(rows: list[list[Any]]) -> str:
    text = io.StringIO()
    csv.writer(text).writerows(rows)
    return text.getvalue()


def write_run(out: Path, result: dict[str, Any]) -> None:
    """acc_matrix.csv, acc_matrix.png, then results.json (last: its presence marks a finished run)
    in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    t = len(result["acc_matrix"])
    rows = [["after_task"] + [f"task_{j}" for j in range(t)]]
    rows += [
        [i] + [f"{v:.6f}" for v in row] + [""] * (t - len(row))
        for i, row in enumerate(result["acc_matrix"])
    ]
    write_atomic(out / "acc_matrix.csv", _csv(rows))
    plot_run(result, out / "acc_matrix.png")
    write_atomic(out / "results.json", json.dumps(result, indent=2) + "\n")


def colour_range(values: list[float]) -> tuple[float, float]:
    """The colour scale of the accuracy heatmap: the data's own range (widened to at least 0.01 so
    equal values still map to a colour), so 0.97 and 1.00 look different."""
    low, high = min(values), max(values)
    if high - low < 0.01:
        mid = (low + high) / 2
        low, high = mid - 0.005, mid + 0.005
    return low, high


def plot_run(result: dict[str, Any], path: Path) -> None:
    """Heatmap of R (left), each task's accuracy over the sequence (middle) and, for a method with
    a capacity measure, the capacity used after every task (right).

    Args:
        result: a run's result, as ``run`` returns it or its ``results.json`` holds it.
        path: the image file to write (its suffix picks the format, e.g. ``.png``).
    """
    matrix = result["acc_matrix"]
    t = len(matrix)
    plt = _pyplot()
    usage = result.get("importance_usage", [])
    has_usage = any(u is not None for u in usage)
    if not t:
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.axis("off")
        ax.text(0.5, 0.5, divergence_text(result) or "no task finished", ha="center", wrap=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return
    grid = [[row[j] if j < len(row) else math.nan for j in range(t)] for row in matrix]
    low, high = colour_range([v for row in matrix for v in row])
    fig, axes = plt.subplots(1, 3 if has_usage else 2, figsize=(16.5 if has_usage else 11, 4.5))
    ax1, ax2 = axes[0], axes[1]
    im = ax1.imshow(grid, vmin=low, vmax=high, cmap="viridis")
    for i in range(t):
        for j in range(i + 1):
            dark = (grid[i][j] - low) / (high - low) < 0.6
            ax1.text(
                j,
                i,
                f"{grid[i][j]:.3f}",
                ha="center",
                va="center",
                fontsize=8 if t <= 10 else 5,
                color="white" if dark else "black",
            )
    ax1.set(
        xlabel="evaluated on task j",
        ylabel="after learning task i",
        xticks=range(t),
        yticks=range(t),
        title=f"accuracy matrix R[i][j] (colours span {low:.3f}-{high:.3f})",
    )
    fig.colorbar(im, ax=ax1, fraction=0.046)
    for j in range(t):
        ax2.plot(range(j, t), [matrix[i][j] for i in range(j, t)], marker="o", label=f"task {j}")
    margin = (high - low) * 0.05
    ax2.set(
        xlabel="after learning task",
        ylabel="test accuracy",
        ylim=(low - margin, high + margin),
        xticks=range(t),
        title=f"ACC {result['acc']:.3f}, forgetting {result['forgetting']:.3f}",
    )
    ax2.legend(fontsize=7, ncol=2)
    if has_usage:
        plot_usage(axes[2], usage)
    diverged = "  (DIVERGED: see results.json)" if result.get("diverged") else ""
    fig.suptitle(f"{result['method']} on {result['sequence']}{diverged}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_usage(ax: Any, usage: list[dict[str, Any] | None]) -> None:
    """The capacity used after every task: SPG's mean importance, fraction of shared elements
    above 0.9 and head scale; HAT's mean accumulated gate and fraction of units above 0.5."""
    tasks = [i for i, u in enumerate(usage) if u is not None]
    rows = [usage[i] for i in tasks]
    if rows[0]["of"] == "units":
        lines = (("mean", "mean accumulated gate"), ("above_0.5", "fraction of units above 0.5"))
        title = "capacity used (HAT's gates)"
    else:
        lines = (
            ("mean", "mean importance A"),
            ("above_0.9", "fraction of A above 0.9"),
            ("head_scale", "head scale 1 - mean(A)"),
        )
        title = "capacity used (SPG's importance)"
    for key, label in lines:
        values = [r[key] for r in rows]
        ax.plot(tasks, values, marker="o", label=label)
        for x, y in zip(tasks, values, strict=True):
            ax.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(0, 5), fontsize=7)
    ax.set(xlabel="after learning task", ylim=(0, 1.05), xticks=tasks, title=title)
    ax.legend(fontsize=8)


METRICS = ("acc", "bwt", "forgetting", "acc_weighted", "bwt_weighted", "forgetting_weighted")


def _mean_std(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "std": None}
    mean = sum(values) / len(values)
    std = (
        math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        if len(values) > 1
        else 0.0
    )
    return {"mean": mean, "std": std}


def aggregate(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method: mean and sample standard deviation over seeds of every metric and of the
    wall-clock time, and how many runs diverged (a run without a finished task has no metrics and
    is left out of their means)."""
    rows = []
    for method in dict.fromkeys(r["method"] for r in results):
        runs = [r for r in results if r["method"] == method]
        row: dict[str, Any] = {"method": method, "seeds": [r["config"]["seed"] for r in runs]}
        for key in (*METRICS, "time_s"):
            row[key] = _mean_std([r[key] for r in runs if r.get(key) is not None])
        row["diverged"] = sum(bool(r.get("diverged")) for r in runs)
        rows.append(row)
    return rows


def comparison_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: mean ± std over seeds, wall-clock seconds per run, diverged runs."""
    head = "| method | seeds | " + " | ".join(METRICS) + " | wall-clock s | diverged |"
    lines = [head, "|" + "---|" * (len(METRICS) + 4)]
    for row in rows:
        cells = " | ".join(f"{_number(row[k]['mean'])} ± {_number(row[k]['std'])}" for k in METRICS)
        time = f"{_number(row['time_s']['mean'], 1)} ± {_number(row['time_s']['std'], 1)}"
        lines.append(
            f"| {row['method']} | {len(row['seeds'])} | {cells} | {time} | {row['diverged']} |"
        )
    return "\n".join(lines)


def write_comparison(
    out: Path,
    sequence: str,
    results: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    planned: int,
) -> None:
    """comparison.{json,md,csv,png}; with fewer than ``planned`` runs finished they say it
    is partial."""
    out.mkdir(parents=True, exist_ok=True)
    partial = (
        f"partial: {len(results)} of {planned} runs finished\n\n" if len(results) < planned else ""
    )
    write_atomic(
        out / "comparison.json",
        json.dumps(
            {
                "sequence": sequence,
                "runs_finished": len(results),
                "runs_planned": planned,
                "summary": rows,
            },
            indent=2,
        )
        + "\n",
    )
    write_atomic(out / "comparison.md", partial + comparison_table(rows) + "\n")
    keys = (*METRICS, "time_s")
    table = [
        ["method", "seeds"] + [f"{k}_{s}" for k in keys for s in ("mean", "std")] + ["diverged"]
    ]
    table += [
        [row["method"], len(row["seeds"])]
        + [_number(row[k][s], 6) for k in keys for s in ("mean", "std")]
        + [row["diverged"]]
        for row in rows
    ]
    write_atomic(out / "comparison.csv", _csv(table))
    plot_comparison(
        sequence + (" (partial)" if partial else ""), results, rows, out / "comparison.png"
    )


def plot_comparison(
    sequence: str, results: list[dict[str, Any]], rows: list[dict[str, Any]], path: Path
) -> None:
    """Bars of ACC and forgetting (mean ± std over seeds), and average accuracy over the sequence
    per method."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    methods = [r["method"] for r in rows]
    width = 0.38
    for k, (key, label) in enumerate((("acc", "ACC"), ("forgetting", "forgetting"))):
        xs = [i + (k - 0.5) * width for i in range(len(methods))]
        ax1.bar(
            xs,
            [math.nan if r[key]["mean"] is None else r[key]["mean"] for r in rows],
            width,
            yerr=[0.0 if r[key]["std"] is None else r[key]["std"] for r in rows],
            capsize=4,
            label=label,
        )
    ax1.set(
        xticks=range(len(methods)), xticklabels=methods, ylim=(0, 1.05), title="after the last task"
    )
    ax1.legend()
    t = max(len(r["acc_matrix"]) for r in results)
    for method in methods:
        runs = [r for r in results if r["method"] == method and len(r["acc_matrix"]) == t]
        if runs:
            curve = [
                sum(sum(r["acc_matrix"][i]) / (i + 1) for r in runs) / len(runs) for i in range(t)
            ]
            ax2.plot(range(t), curve, marker="o", label=method)
    ax2.set(
        xlabel="after learning task",
        ylabel="average accuracy on tasks so far",
        ylim=(0, 1.02),
        xticks=range(t),
        title="over the sequence (mean over seeds that finished it)",
    )
    ax2.legend()
    fig.suptitle(f"methods compared on {sequence}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
