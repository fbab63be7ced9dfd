"""``spg-fast``: run SPG and baselines on task sequences from the command line."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from spg_fast.harness.models import BACKBONES
from spg_fast.harness.sequences import SEQUENCES
from spg_fast.harness.training import METHODS, TrainConfig

SEQUENCE_HELP = "sequences: " + "; ".join(
    f"{name} ({(fn.__doc__ or '').strip().splitlines()[0] if fn.__doc__ else 'see README'})"
    for name, fn in SEQUENCES.items())


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sequence", default="digits", choices=list(SEQUENCES), metavar="NAME",
                   help=f"task sequence (default digits): {', '.join(SEQUENCES)}")
    p.add_argument("--backbone", choices=BACKBONES, help="default: mlp for vector data, alexnet for images")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--data-dir", type=Path, help="folder holding the sequence's files (not needed for digits)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"], help="SPG backend")
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        value = getattr(defaults, f.name)
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(value), default=value,
                       help=f"training protocol (default {value})")


def _config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="spg-fast", description="SPG (parameter-level soft-masking) for continual "
                                  "learning: run methods on task sequences and report accuracy, forgetting and "
                                  "transfer.", epilog=SEQUENCE_HELP)
    sub = top.add_subparsers(dest="command")
    run = sub.add_parser("run", help="one method on one sequence (default: spg on the embedded digits)",
                         epilog=SEQUENCE_HELP)
    run.add_argument("--method", default="spg", choices=METHODS, help="spg, finetune (no protection) or one "
                     "(a separate network per task); default spg")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--out", type=Path, default=Path("runs/latest"), help="output folder (default runs/latest)")
    _add_common(run)
    cmp = sub.add_parser("compare", help="several methods over several seeds, side by side", epilog=SEQUENCE_HELP)
    cmp.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated (default {','.join(METHODS)})")
    cmp.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    cmp.add_argument("--out", type=Path, default=Path("runs/compare"), help="output folder (default runs/compare)")
    _add_common(cmp)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command is None:
        args = parser().parse_args(["run", *(argv or [])])
    from spg_fast.harness import api, report
    from spg_fast.harness.formats import DataError

    common = dict(backbone=args.backbone, device=args.device, data_dir=args.data_dir, config=_config(args),
                  backend=args.backend)
    try:
        if args.command == "run":
            result = api.run(args.sequence, args.method, seed=args.seed, out=args.out, **common)
            print(report.matrix_table(result["acc_matrix"]))
            print(report.summary_table(result))
        else:
            methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
            seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
            result = api.compare(args.sequence, methods, seeds, out=args.out, **common)
            print(report.comparison_table(result["summary"]))
    except (DataError, ValueError) as e:
        print(f"spg-fast: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
