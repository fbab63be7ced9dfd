"""What each storage format of SPG's keep factors costs in protection: the same runs of
``bench.adaptive`` with the keep factors stored as float32, bfloat16 and uint8.

    python -m bench.storage_study --out bench/results/<machine>-storage
        [--sequences digits-permuted,fashion-mnist] [--seeds 0,1,2,3,4] [--epochs 20]
        [--optimizers sgd:0.1,adamw:1e-3] [--formats float32,bfloat16,uint8]

One ``bench.adaptive`` run per format into ``<out>/<format>/`` (fine-tuning only once, in the
float32 folder: it stores nothing; ``--formats`` runs some formats again and keeps the others'
folders), then ``storage.{md,json}``: per sequence, optimizer and format,
ACC, forgetting and BWT (mean ± sample standard deviation over the seeds), the paired per-seed
difference in forgetting from float32 storage, and the bytes SPG keeps per shared parameter.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from bench import adaptive

FORMATS = {"float32": 4, "bfloat16": 2, "uint8": 1}


def _runs(folder: Path) -> list[dict[str, Any]]:
    return json.loads((folder / "results.json").read_text())["runs"]


def _spread(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {sd:.3f}"


def table(out: Path) -> tuple[str, list[dict[str, Any]]]:
    """The comparison of the formats' runs under ``out``, as markdown and rows."""
    by: dict[tuple, dict[int, dict[str, Any]]] = {}
    for fmt in FORMATS:
        for run in _runs(out / fmt):
            label = "finetune" if run["method"] == "finetune" else fmt
            key = (run["sequence"], run["optimizer"], run["lr"], label)
            by.setdefault(key, {})[run["seed"]] = run
    rows = []
    lines = [
        "| sequence | optimizer | lr | storage | bytes/parameter | ACC | forgetting | BWT "
        "| forgetting vs float32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = ["finetune", *FORMATS]
    first = {key[:3]: i for i, key in reversed(list(enumerate(by)))}
    for (sequence, optimizer, lr, label), runs in sorted(
        by.items(), key=lambda item: (first[item[0][:3]], order.index(item[0][3]))
    ):
        base = by.get((sequence, optimizer, lr, "float32"), {})
        paired = [r["forgetting"] - base[s]["forgetting"] for s, r in runs.items() if s in base]
        row = {
            "sequence": sequence,
            "optimizer": optimizer,
            "lr": lr,
            "storage": label,
            "bytes_per_parameter": FORMATS.get(label, 0),
            "seeds": sorted(runs),
            **{m: [r[m] for r in runs.values()] for m in ("acc", "forgetting", "bwt")},
            "forgetting_vs_float32": paired if label not in ("finetune", "float32") else None,
        }
        rows.append(row)
        versus = "" if row["forgetting_vs_float32"] is None else _spread(paired)
        lines.append(
            f"| {sequence} | {optimizer} | {lr:g} | {label} | {row['bytes_per_parameter']} "
            f"| {_spread(row['acc'])} | {_spread(row['forgetting'])} | {_spread(row['bwt'])} "
            f"| {versus} |"
        )
    return "\n".join(lines) + "\n", rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.storage_study", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sequences", default="digits-permuted,fashion-mnist")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--epochs", default="20")
    parser.add_argument("--optimizers", default="sgd:0.1,adamw:1e-3")
    parser.add_argument("--tasks", help="only the first this many tasks of each sequence")
    parser.add_argument(
        "--formats", default=",".join(FORMATS), help="the formats to run (the others are read)"
    )
    args = parser.parse_args(argv)
    formats = [f for f in args.formats.split(",") if f]
    if not set(formats) <= set(FORMATS):
        parser.error(f"--formats takes {', '.join(FORMATS)}")
    common = ["--sequences", args.sequences, "--seeds", args.seeds, "--epochs", args.epochs]
    common += ["--optimizers", args.optimizers, "--overwrite"]
    if args.tasks:
        common += ["--tasks", args.tasks]
    for fmt in formats:
        methods = "finetune,spg" if fmt == "float32" else "spg"
        adaptive.main(
            ["--out", str(args.out / fmt), *common, "--methods", methods, "--importance-dtype", fmt]
        )
    markdown, rows = table(args.out)
    header = (
        "# SPG's keep factors stored as float32, bfloat16 and uint8\n\n"
        f"`python -m bench.storage_study {' '.join(sys.argv[1:] if argv is None else argv)}`; the "
        "runs, their commands and their environment "
        "are in the per-format folders (results.json).\n\n"
    )
    (args.out / "storage.md").write_text(header + markdown)
    (args.out / "storage.json").write_text(json.dumps(rows, indent=1))
    print(header + markdown)


if __name__ == "__main__":
    main()
