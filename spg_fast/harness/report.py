"""Readable and machine-readable outputs of runs: text tables, JSON, CSV and PNG plots."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def matrix_table(matrix: list[list[float]]) -> str:
    """The accuracy matrix as text: row i = after task i, column j = task j."""
    t = len(matrix)
    lines = ["after \\ on " + " ".join(f"{j:>6}" for j in range(t))]
    for i, row in enumerate(matrix):
        lines.append(f"task {i:<6}" + " ".join(f"{v:6.3f}" for v in row))
    return "\n".join(lines)


def summary_table(result: dict[str, Any]) -> str:
    keys = ("acc", "bwt", "forgetting", "acc_weighted", "bwt_weighted", "forgetting_weighted")
    head = f"{result['method']} on {result['sequence']} (seed {result['config']['seed']})"
    return head + "\n" + "  ".join(f"{k} {result[k]:.4f}" for k in keys)


def write_run(out: Path, result: dict[str, Any]) -> None:
    """results.json, acc_matrix.csv and acc_matrix.png in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    t = len(result["acc_matrix"])
    with open(out / "acc_matrix.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["after_task"] + [f"task_{j}" for j in range(t)])
        for i, row in enumerate(result["acc_matrix"]):
            writer.writerow([i] + [f"{v:.6f}" for v in row] + [""] * (t - len(row)))
    plot_run(result, out / "acc_matrix.png")


def plot_run(result: dict[str, Any], path: Path) -> None:
    """Heatmap of R (left) and each task's accuracy over the sequence (right)."""
    matrix = result["acc_matrix"]
    t = len(matrix)
    grid = [[row[j] if j < len(row) else math.nan for j in range(t)] for row in matrix]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    im = ax1.imshow(grid, vmin=0, vmax=1, cmap="viridis")
    for i in range(t):
        for j in range(i + 1):
            ax1.text(j, i, f"{grid[i][j]:.2f}", ha="center", va="center", fontsize=8,
                     color="white" if grid[i][j] < 0.6 else "black")
    ax1.set(xlabel="evaluated on task j", ylabel="after learning task i", xticks=range(t), yticks=range(t),
            title=f"accuracy matrix R[i][j] — {result['method']}")
    fig.colorbar(im, ax=ax1, fraction=0.046)
    for j in range(t):
        ax2.plot(range(j, t), [matrix[i][j] for i in range(j, t)], marker="o", label=f"task {j}")
    ax2.set(xlabel="after learning task", ylabel="test accuracy", ylim=(0, 1.02), xticks=range(t),
            title=f"ACC {result['acc']:.3f}, forgetting {result['forgetting']:.3f}")
    ax2.legend(fontsize=7, ncol=2)
    fig.suptitle(f"{result['method']} on {result['sequence']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


METRICS = ("acc", "bwt", "forgetting", "acc_weighted", "bwt_weighted", "forgetting_weighted")


def aggregate(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method: mean and sample standard deviation over seeds of every metric."""
    rows = []
    for method in dict.fromkeys(r["method"] for r in results):
        runs = [r for r in results if r["method"] == method]
        row: dict[str, Any] = {"method": method, "seeds": [r["config"]["seed"] for r in runs]}
        for key in METRICS:
            values = [r[key] for r in runs]
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
            row[key] = {"mean": mean, "std": std}
        rows.append(row)
    return rows


def comparison_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: mean ± std over seeds."""
    head = "| method | seeds | " + " | ".join(METRICS) + " |"
    lines = [head, "|" + "---|" * (len(METRICS) + 2)]
    for row in rows:
        cells = " | ".join(f"{row[k]['mean']:.4f} ± {row[k]['std']:.4f}" for k in METRICS)
        lines.append(f"| {row['method']} | {len(row['seeds'])} | {cells} |")
    return "\n".join(lines)


def write_comparison(out: Path, sequence: str, results: list[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps({"sequence": sequence, "summary": rows}, indent=2) + "\n")
    (out / "comparison.md").write_text(comparison_table(rows) + "\n")
    with open(out / "comparison.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "seeds"] + [f"{k}_{s}" for k in METRICS for s in ("mean", "std")])
        for row in rows:
            writer.writerow([row["method"], len(row["seeds"])] + [f"{row[k][s]:.6f}" for k in METRICS
                                                                   for s in ("mean", "std")])
    plot_comparison(sequence, results, rows, out / "comparison.png")


def plot_comparison(sequence: str, results: list[dict[str, Any]], rows: list[dict[str, Any]], path: Path) -> None:
    """Bars of ACC and forgetting (mean ± std over seeds), and average accuracy over the sequence per method."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    methods = [r["method"] for r in rows]
    width = 0.38
    for k, (key, label) in enumerate((("acc", "ACC"), ("forgetting", "forgetting"))):
        xs = [i + (k - 0.5) * width for i in range(len(methods))]
        ax1.bar(xs, [r[key]["mean"] for r in rows], width, yerr=[r[key]["std"] for r in rows], capsize=4,
                label=label)
    ax1.set(xticks=range(len(methods)), xticklabels=methods, ylim=(0, 1.05), title="after the last task")
    ax1.legend()
    for method in methods:
        runs = [r for r in results if r["method"] == method]
        t = len(runs[0]["acc_matrix"])
        curve = [sum(sum(r["acc_matrix"][i]) / (i + 1) for r in runs) / len(runs) for i in range(t)]
        ax2.plot(range(t), curve, marker="o", label=method)
    ax2.set(xlabel="after learning task", ylabel="average accuracy on tasks so far", ylim=(0, 1.02), xticks=range(t),
            title="over the sequence (mean over seeds)")
    ax2.legend()
    fig.suptitle(f"methods compared on {sequence}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
