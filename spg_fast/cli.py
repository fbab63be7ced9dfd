"""``spg-fast``: run SPG and the methods it is compared with on task sequences from the command
line. Every value is checked before any data is read or any training starts; a bad one is a one-line
``spg-fast: error: --option: why`` and exit code 2. ``--resume`` takes the settings from the output
folder. A run that diverged ends with a one-line error and exit code 1. Under torchrun
(``torchrun --nproc-per-node N -m spg_fast.cli run ...``, or ``--nproc N``) the processes train
together; rank 0 prints the results. Importing this module needs only the core dependencies, so
``--help`` works without the ``harness`` extra, and a run without it says what to install."""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, NoReturn

from spg_fast.harness import extras, resume
from spg_fast.harness.config import ConfigError, TrainConfig
from spg_fast.harness.methods import METHODS, MethodOptions
from spg_fast.harness.methods.options import applies_to
from spg_fast.harness.models import BACKBONES
from spg_fast.harness.outputs import OutputError
from spg_fast.harness.parallel import launched_world_size
from spg_fast.harness.protocol import PROTOCOLS, preset, resolve
from spg_fast.harness.sequences import EMBEDDED, SEQUENCES

SEQUENCE_TEXT = {
    "digits": "scikit-learn's bundled 8x8 digits, 5 tasks of 2 classes (embedded, the default)",
    "digits-permuted": (
        "the same digits, 10 tasks of all 10 classes, one pixel permutation per task (embedded)"
    ),
    "fashion-mnist": "Fashion-MNIST's IDX files in <data-dir>/fashion-mnist/, 5 tasks of 2 classes",
    "cifar100-10": (
        "CIFAR-100 (python release) in <data-dir>/cifar-100-python/, 10 tasks of 10 classes"
    ),
    "cifar100-20": "the same, 20 tasks of 5 classes",
    "tinyimagenet-10": "TinyImageNet in <data-dir>/tiny-imagenet-200/, 10 tasks of 20 classes",
    "tinyimagenet-20": "the same, 20 tasks of 10 classes",
    "femnist-10": (
        "LEAF's FEMNIST json files in <data-dir>/femnist/{train,test}/, 10 groups of "
        "writers, 62 classes"
    ),
    "femnist-20": "the same, 20 groups of writers",
}
EPILOG = (
    "sequences:\n"
    + "\n".join(f"  {name:<16} {SEQUENCE_TEXT[name]}" for name in SEQUENCES)
    + "\n\nWithout --data-dir files are read from ./data (Fashion-MNIST also from "
    "/usr/share/datasets/fashion-mnist,\nDebian's dataset-fashion-mnist). Ctrl-C stops after "
    "saving; --resume continues."
)
MAX_SEED = 2**32 - 1
# Defaults of the options that define a run; None in the parser, so that --resume can tell an
# option given from one left out.
DEFAULTS = {
    "sequence": "digits",
    "protocol": "quick",
    "method": "spg",
    "seed": 0,
    "methods": METHODS,
    "seeds": (0, 1, 2),
}
METHOD_TEXT = {
    "spg": "spg (default: parameter-level soft-masking)",
    "finetune": "finetune (the same network without protection)",
    "one": "one (a network per task)",
    "hat": "hat (hard attention to the task, Serra et al. 2018)",
    "ewc": "ewc (elastic weight consolidation, online, Kirkpatrick et al. 2017)",
}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``spg-fast: error: --option: why`` and exit code 2."""

    def error(self, message: str) -> NoReturn:
        unknown = message.removeprefix("unrecognized arguments: ")
        if unknown != message:
            message = f"{unknown.split()[0]}: not an option here (see --help)"
        self.exit(2, f"spg-fast: error: {message.removeprefix('argument ')}\n")


def _whole(low: int, high: int | None = None) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            span = f"between {low} and {high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be an integer {span}, got {text!r}")
        return value

    return parse


def _setting_type(f: Any) -> Any:
    kind, check = type(f.default), f.metadata["check"]

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            kind_name = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"must be {kind_name}, got {text!r}") from None
        if kind is float and math.isnan(value):
            raise argparse.ArgumentTypeError("must be a number, got 'nan'")
        why = check(value) if check else None
        if why:
            raise argparse.ArgumentTypeError(f"{why}, got {text!r}")
        return value

    return parse


def _list(kind: str, item: Any) -> Any:
    def parse(text: str) -> tuple[Any, ...]:
        parts = [p.strip() for p in text.split(",")]
        if not any(parts):
            raise argparse.ArgumentTypeError(f"give at least one {kind}")
        if not all(parts):
            raise argparse.ArgumentTypeError(f"empty {kind} in {text!r}")
        values = tuple(item(p) for p in parts)
        repeated = sorted({p for p in parts if parts.count(p) > 1})
        if repeated:
            raise argparse.ArgumentTypeError(f"{', '.join(repeated)} given more than once")
        return values

    return parse


def _method(text: str) -> str:
    if text not in METHODS:
        raise argparse.ArgumentTypeError(
            f"unknown method {text!r}; choose from {', '.join(METHODS)}"
        )
    return text


def _seed(text: str) -> int:
    return _whole(0, MAX_SEED)(text)


def _device(text: str) -> str:
    import torch

    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"unknown device {text!r}; use cpu, cuda or cuda:N"
        ) from None
    if dev.type == "cpu":
        return text
    if dev.type != "cuda":
        raise argparse.ArgumentTypeError(f"{text!r}: the harness runs on cpu or cuda")
    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(
            f"{text!r}: no CUDA device is available to this torch ({torch.__version__})"
        )
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(
            f"{text!r}: there are {torch.cuda.device_count()} CUDA device(s)"
        )
    return text


def _folder(text: str) -> Path:
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text} does not exist")
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a folder")
    return path


def _setting_help(f: Any) -> str:
    quick = preset("quick", "digits")[f.name]
    paper = (
        "the authors' rate for the sequence (0 where they have none)"
        if f.name.startswith("dropout")
        else (
            "on for image sequences"
            if f.name == "normalize"
            else preset("paper", "cifar100-10")[f.name]
        )
    )
    if f.name in ("lr", "lr_min"):
        quick = (
            f"{quick} with sgd, {preset('quick', 'digits', 'sgd-momentum')[f.name]} with "
            f"sgd-momentum, {preset('quick', 'digits', 'adamw')[f.name]} with adamw"
        )
        paper = f"{paper} with sgd"
    if f.name == "normalize":
        quick = "off"
    return f"{f.metadata['help']} (quick: {quick}; paper: {paper})"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sequence",
        default=None,
        choices=list(SEQUENCES),
        metavar="NAME",
        help="the task sequence (default digits; the list is below)",
    )
    p.add_argument(
        "--protocol",
        default=None,
        choices=PROTOCOLS,
        help="preset for every training setting below: quick (seconds on a CPU, default) or "
        "paper (the authors' setting for the sequence); an option given explicitly overrides "
        "its preset value",
    )
    p.add_argument(
        "--backbone",
        choices=BACKBONES,
        help="mlp, alexnet (the authors' conv net) or resnet18 (reduced, with BatchNorm); default: "
        "mlp for the digits, alexnet for image sequences",
    )
    p.add_argument("--device", type=_device, default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument(
        "--data-dir",
        type=_folder,
        metavar="DIR",
        help="folder holding the sequence's files (default ./data; not used by the digits)",
    )
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "torch", "triton"],
        help="SPG's implementation: auto (Triton kernels on CUDA, PyTorch "
        "otherwise), torch or triton",
    )
    p.add_argument(
        "--tasks", type=_whole(1), metavar="N", help="learn only the sequence's first N tasks"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run(s) in --out after the last finished task (finished runs are kept) "
        "with the settings saved there; an option given again must agree with them",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an earlier run's files in --out"
    )
    p.add_argument(
        "--nproc",
        type=_whole(1),
        metavar="N",
        help="train with N processes on this machine, started through torchrun's launcher (each "
        "takes its share of every batch); without torchrun: under it, use its --nproc-per-node",
    )
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="with several processes: shard the network with FSDP2 (fully_shard) instead of "
        "replicating it with DDP (the default)",
    )
    p.add_argument(
        "--threads",
        type=_whole(1),
        metavar="N",
        help="torch's CPU threads (default: 1 for networks under 1M parameters, else the free "
        "cores: the cores this process may use less the load average; OMP_NUM_THREADS is kept)",
    )
    p.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write the metrics as TensorBoard event files into <out>/tensorboard/ (needs "
        "the tensorboard package)",
    )
    for f in fields(MethodOptions):
        default = f.default if isinstance(f.default, str) else f"{f.default:g}"
        text = f"{f.metadata['help']} (default {default}; {f.metadata['method']} only)"
        if f.metadata["choices"]:
            p.add_argument(_flag(f.name), choices=f.metadata["choices"], default=None, help=text)
        else:
            p.add_argument(
                _flag(f.name), type=_setting_type(f), default=None, metavar="FLOAT", help=text
            )
    for f in fields(TrainConfig):
        flag = _flag(f.name)
        if type(f.default) is bool:
            p.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=_setting_help(f)
            )
        elif f.metadata["choices"]:
            p.add_argument(flag, choices=f.metadata["choices"], default=None, help=_setting_help(f))
        else:
            p.add_argument(
                flag,
                type=_setting_type(f),
                default=None,
                metavar=type(f.default).__name__.upper(),
                help=_setting_help(f),
            )


def parser() -> argparse.ArgumentParser:
    top = _Parser(
        prog="spg-fast",
        description="SPG (parameter-level soft-masking) for continual learning: run methods on "
        "task sequences and report accuracy, forgetting and transfer. Without a command: run.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = top.add_subparsers(dest="command", metavar="{run,compare}")
    run = sub.add_parser(
        "run",
        help="one method on one sequence (default: spg on the digits)",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Learn the sequence's tasks in order with one method; print and write the "
        "accuracy matrix and metrics.",
    )
    run.add_argument(
        "--method",
        default=None,
        choices=METHODS,
        help=", ".join(METHOD_TEXT[m] for m in METHODS),
    )
    run.add_argument(
        "--seed",
        type=_seed,
        default=None,
        help="seed of the class order, splits, initial weights and batch order (default 0)",
    )
    run.add_argument(
        "--out",
        type=Path,
        help="output folder (default runs/<sequence>-<method>-seed<N>-<date-time>)",
    )
    _add_common(run)
    cmp = sub.add_parser(
        "compare",
        help="several methods over several seeds, side by side",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run every method with every seed on one sequence; write each run and a "
        "mean ± standard deviation table.",
    )
    cmp.add_argument(
        "--methods",
        type=_list("method", _method),
        default=None,
        help=f"comma-separated (default {','.join(METHODS)})",
    )
    cmp.add_argument(
        "--seeds",
        type=_list("seed", _seed),
        default=None,
        help="comma-separated seeds (default 0,1,2)",
    )
    cmp.add_argument(
        "--out", type=Path, help="output folder (default runs/compare-<sequence>-<date-time>)"
    )
    _add_common(cmp)
    return top


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """The options that define a run (or comparison) given on the command line, by setting name."""
    names = [
        "sequence",
        "protocol",
        "backbone",
        "tasks",
        *(("method", "seed") if args.command == "run" else ("methods", "seeds")),
        *(f.name for f in fields(TrainConfig)),
        *(f.name for f in fields(MethodOptions)),
    ]
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def _resumed(p: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """The settings saved in ``--out``, checked against the options given and filled into
    ``args``."""
    if args.out is None:
        p.error("--resume: give --out, the folder of the run to continue")
    saved_in = resume.saved_run if args.command == "run" else resume.saved_compare
    try:
        settings, values = saved_in(args.out)
        resume.check_given(args.out, values, _given(args))
    except OutputError as e:
        p.error(str(e))
    except ConfigError as e:
        p.error(f"{_flag(e.name)}: {e.why}")
    for key in ("sequence", "protocol", "backbone", "tasks"):
        setattr(args, key, settings[key])
    for key in ("method", "seed") if args.command == "run" else ("methods", "seeds"):
        setattr(args, key, tuple(settings[key]) if key in ("methods", "seeds") else settings[key])
    if args.data_dir is None and settings["data_dir"] is not None:
        args.data_dir = Path(settings["data_dir"])
    return settings


def _check(
    p: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Checks that span options; returns the training settings and method options that define the
    run: those given, or with ``--resume`` those saved in ``--out``."""
    if args.resume and args.overwrite:
        p.error("--resume: cannot be combined with --overwrite")
    if args.resume:
        settings = _resumed(p, args)
        explicit, options = settings["config"], settings["options"]
    else:
        for key, value in DEFAULTS.items():
            if getattr(args, key, "absent") is None:
                setattr(args, key, value)
        given = _given(args)
        explicit = {f.name: given[f.name] for f in fields(TrainConfig) if f.name in given}
        options = {f.name: given[f.name] for f in fields(MethodOptions) if f.name in given}
    in_use = (args.method,) if args.command == "run" else args.methods
    for name in options:
        if applies_to(name) not in in_use:
            p.error(f"{_flag(name)}: applies to --method {applies_to(name)} only")
    if args.tensorboard:
        try:
            extras.require_tensorboard()
        except extras.MissingExtraError as e:
            p.error(str(e))
    if args.data_dir is not None and args.sequence in EMBEDDED:
        p.error(f"--data-dir: the {args.sequence} sequence is embedded and reads no files")
    if args.backend == "triton":
        from spg_fast._backend import triton_available

        if not triton_available():
            p.error("--backend: triton is not installed")
        if not args.device.startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
            p.error(
                "--backend: triton needs --device cuda (on the CPU only under TRITON_INTERPRET=1)"
            )
    # torchrun's own parser takes --nproc for its --nproc-per-node, so under torchrun --nproc never
    # gets here.
    world = max(launched_world_size(), args.nproc or 1)
    if args.fsdp and world == 1:
        p.error(
            "--fsdp: shards the network over several processes: launch with torchrun "
            "--nproc-per-node N, or pass --nproc N"
        )
    if world > 1 and args.device.startswith("cuda:"):
        p.error(
            f"--device: with {world} processes each takes its own GPU (cuda:LOCAL_RANK); give "
            f"cuda, not {args.device}"
        )
    single = [m for m in in_use if m in ("hat", "ewc")]
    if world > 1 and single:
        p.error(f"--method: {single[0]} runs in one process (not under torchrun or --nproc)")
    try:
        cfg, _ = resolve(args.protocol, args.sequence, explicit)
        MethodOptions(**options)
    except ConfigError as e:
        p.error(f"{_flag(e.name)}: {e.why}")
    if cfg.batch_size % world:
        p.error(
            f"--batch-size: {cfg.batch_size} does not split evenly over {world} processes; give "
            f"a multiple of {world}"
        )
    return explicit, options


def _say(line: str) -> None:
    """``line`` on stderr in one write, so that the lines of processes sharing it do
    not interleave."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _resume_command(argv: list[str], args: argparse.Namespace, implicit_run: bool) -> str:
    words = [a for a in argv if a != "--overwrite"]
    if implicit_run:
        words.insert(0, "run")
    if not any(a == "--out" or a.startswith("--out=") for a in words):
        words += ["--out", str(args.out)]
    if "--resume" not in words:
        words.append("--resume")
    launched = launched_world_size()
    if launched > 1 and args.nproc is None:
        return shlex.join(
            ["torchrun", "--nproc-per-node", str(launched), "-m", "spg_fast.cli", *words]
        )
    return shlex.join(["spg-fast", *words])


def _relaunch(argv: list[str], nproc: int) -> int:
    """This command in ``nproc`` processes on this machine, started by torchrun (``--standalone``: a
    free port); the exit code of the first process that failed (0 when none did, 130 on Ctrl-C)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    launch = get_args_parser().parse_args(
        ["--standalone", "--nproc-per-node", str(nproc), "-m", "spg_fast.cli"]
    )
    launch.training_script_args = (
        argv  # set, not parsed: torchrun's parser would read this command's options
    )
    try:
        run(launch)
    except ChildFailedError as e:
        code = e.get_first_failure()[1].exitcode
        return code if code > 0 else 1
    except SignalException:  # Ctrl-C: the processes got it too; rank 0 said what was saved
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser()
    implicit_run = not argv or argv[0] not in ("run", "compare", "-h", "--help")
    args = p.parse_args(["run", *argv] if implicit_run else argv)
    explicit, options = _check(p, args)
    if args.nproc is not None and args.nproc > 1 and launched_world_size() == 1:
        return _relaunch(argv, args.nproc)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if args.out is None:
        args.out = Path("runs") / (
            f"{args.sequence}-{args.method}-seed{args.seed}-{stamp}"
            if args.command == "run"
            else f"compare-{args.sequence}-{stamp}"
        )
    from spg_fast.harness import api, parallel, report
    from spg_fast.harness.formats import DataError

    # Rank 0 prints the results; every rank prints its error, as a rank may fail alone.
    main_rank = int(os.environ.get("RANK", "0")) == 0
    common = dict(
        backbone=args.backbone,
        data_dir=args.data_dir,
        protocol=args.protocol,
        config=explicit,
        options=options,
        backend=args.backend,
        out=args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        tasks=args.tasks,
        wrapper="fsdp" if args.fsdp else None,
        threads=args.threads,
        tensorboard=args.tensorboard,
    )
    try:
        with parallel.process_group(args.device) as device:
            if args.command == "run":
                result = api.run(
                    args.sequence, args.method, seed=args.seed, device=device, **common
                )
                tables = [report.matrix_table(result["acc_matrix"]), report.summary_table(result)]
                runs = [result]
            else:
                result = api.compare(
                    args.sequence, args.methods, args.seeds, device=device, **common
                )
                tables = [report.comparison_table(result["summary"])]
                runs = result["runs"]
    except api.RunInterrupted as e:
        if main_rank:
            _say(
                f"spg-fast: {e.message}; continue with: {_resume_command(argv, args, implicit_run)}"
            )
        return 130
    except KeyboardInterrupt:
        if main_rank:
            _say(
                f"spg-fast: interrupted; continue with: {_resume_command(argv, args, implicit_run)}"
            )
        return 130
    except DataError as e:
        _say(f"spg-fast: error: --data-dir: {e}")
        return 2
    except extras.MissingExtraError as e:
        _say(f"spg-fast: error: {e}")
        return 2
    except ConfigError as e:
        _say(f"spg-fast: error: {_flag(e.name)}: {e.why}")
        return 2
    except ValueError as e:
        _say(f"spg-fast: error: {e}")
        return 2
    if main_rank:
        print("\n".join(tables))
        print(f"wrote {args.out}/")
    diverged = [r for r in runs if r["diverged"]]
    if main_rank:
        for r in diverged:
            kind = "error" if args.command == "run" else "warning"
            _say(
                f"spg-fast: {kind}: {r['method']} seed {r['config']['seed']} on {r['sequence']} "
                f"{report.divergence_text(r)}"
            )
    return 1 if diverged and args.command == "run" else 0


if __name__ == "__main__":
    sys.exit(main())
