"""The harness as a Python API: ``run`` one method on a task sequence, ``compare`` several over
seeds. Both check every argument and the output folder before training, checkpoint after every task,
resume, and stop cleanly on Ctrl-C (``RunInterrupted``, a ``KeyboardInterrupt``). Under torchrun
every rank calls them: the ranks train together (``spg_fast.harness.parallel``) and rank 0 alone
prints progress and writes the files."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

import spg_fast
from spg_fast.harness import outputs, report
from spg_fast.harness.config import ConfigError, TrainConfig
from spg_fast.harness.metrics import summary
from spg_fast.harness.models import BACKBONES, parameter_count
from spg_fast.harness.parallel import Ranks
from spg_fast.harness.progress import Progress
from spg_fast.harness.protocol import PROTOCOLS, resolve
from spg_fast.harness.sequences import TaskSequence, build_sequence
from spg_fast.harness.training import METHODS, Inputs, Learner, model_factory, train_task

# What may differ between an interrupted run and its resumption: it does not define the experiment.
NOT_COMPARED_ON_RESUME = ("device", "backend", "from_preset", "world_size", "wrapper")


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``run`` or ``compare``; ``message`` says what was saved."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def default_backbone(seq: TaskSequence) -> str:
    """The MLP for vector data, the authors' AlexNet for images."""
    return "mlp" if len(seq.input_shape) == 1 else "alexnet"


def _mode(resume: bool, overwrite: bool) -> str:
    if resume and overwrite:
        raise outputs.OutputError("--resume and --overwrite exclude each other")
    return "resume" if resume else "overwrite" if overwrite else "new"


def _settings(
    protocol: str, name: str, config: TrainConfig | Mapping[str, Any] | None
) -> tuple[TrainConfig, list[str]]:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
    if isinstance(config, TrainConfig):
        return config, []
    return resolve(protocol, name, config)


def _check_same_run(out: Path, saved: dict[str, Any], config: dict[str, Any]) -> None:
    differ = [
        k
        for k in config.keys() | saved.keys()
        if k not in NOT_COMPARED_ON_RESUME and saved.get(k) != config.get(k)
    ]
    if differ:
        shown = "; ".join(
            f"{k} {saved.get(k)!r} there, {config.get(k)!r} here" for k in sorted(differ)[:4]
        )
        raise outputs.OutputError(
            f"--resume: {out} holds a different run ({shown}); use another --out or the "
            "same settings"
        )


def _save(
    out: Path,
    identity: dict[str, Any],
    learner: Learner,
    done: dict[str, list[Any]],
    generator: torch.Generator,
    dev: torch.device,
) -> None:
    """Checkpoint after a task: what defines the run, the networks and SPG, the results so far, the
    RNG states (rank 0's; the other ranks' streams are derived per task, ``Ranks.seed_task``). Every
    rank calls it; rank 0 writes."""
    state = {
        "identity": identity,
        "learner": learner.state_dict(),
        "results": done,
        "rng": {
            "torch": torch.get_rng_state(),
            "generator": generator.get_state(),
            "cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,
        },
    }
    learner.ranks.from_main(lambda: outputs.save_checkpoint(out, state))


def _restore(
    state: dict[str, Any], learner: Learner, generator: torch.Generator, dev: torch.device
) -> dict[str, list[Any]]:
    """Load a checkpoint into ``learner`` and the RNGs; returns the results so far, marked as
    resumed here."""
    learner.load_state_dict(state["learner"])
    torch.set_rng_state(state["rng"]["torch"])
    generator.set_state(state["rng"]["generator"])
    if dev.type == "cuda" and state["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(state["rng"]["cuda"], dev)
    done = state["results"]
    done["resumed_at"] = [*done["resumed_at"], len(done["matrix"])]
    return done


def run(
    sequence: str | TaskSequence = "digits",
    method: str = "spg",
    *,
    backbone: str | None = None,
    seed: int = 0,
    device: str = "cpu",
    out: str | Path | None = None,
    data_dir: str | Path | None = None,
    protocol: str = "quick",
    config: TrainConfig | Mapping[str, Any] | None = None,
    backend: str = "auto",
    progress: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    tasks: int | None = None,
    wrapper: str | None = None,
) -> dict[str, Any]:
    """Learn the tasks of ``sequence`` in order with ``method``; returns (and, with ``out``, writes)
    the results: the accuracy matrix, metrics, timings, the full config and the versions.

    ``config`` is a whole ``TrainConfig``, or a mapping of settings overriding ``protocol``'s
    preset (``quick`` or ``paper``). With ``out``, a checkpoint is written after every task;
    ``resume=True`` continues from it (same metrics as an uninterrupted run) and returns a
    finished run's results without training; ``overwrite=True`` replaces an earlier run there.
    ``progress``: ``auto``, ``bar``, ``lines`` or ``none``. ``tasks`` learns only the sequence's
    first ``tasks`` tasks.

    Under torchrun (the default process group initialised) every rank calls ``run`` with the same
    arguments and ``device`` its own (``cuda:LOCAL_RANK``): ``wrapper`` ``"ddp"`` (the default) or
    ``"fsdp"`` (FSDP2 ``fully_shard``); each rank trains on its share of every batch (the batch
    size must divide by the number of ranks). Rank 0 alone prints and writes; every rank returns
    the results."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if backbone is not None and backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; valid: {', '.join(BACKBONES)}")
    name = sequence.name if isinstance(sequence, TaskSequence) else sequence
    cfg, from_preset = _settings(protocol, name, config)
    dev = torch.device(device)
    ranks = Ranks(wrapper, dev)
    if cfg.batch_size % ranks.world:
        raise ConfigError(
            "batch_size",
            f"{cfg.batch_size} does not split evenly over {ranks.world} processes; give "
            f"a multiple of {ranks.world}",
        )
    out = Path(out) if out is not None else None
    mode = _mode(resume, overwrite)
    remove = ranks.from_main(lambda: outputs.check(out, mode)) if out is not None else []
    seq = (
        sequence
        if isinstance(sequence, TaskSequence)
        else build_sequence(sequence, data_dir, seed, protocol)
    )
    if tasks is not None:
        if not 1 <= tasks <= len(seq.tasks):
            raise ConfigError("tasks", f"{seq.name} has {len(seq.tasks)} tasks, got {tasks}")
        seq = replace(seq, tasks=seq.tasks[:tasks])
    backbone = backbone or default_backbone(seq)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    make_model = model_factory(backbone, seq, cfg)
    with torch.random.fork_rng(devices=[]):
        probe = make_model()
    inputs = Inputs(seq, cfg, dev, ranks)
    learner = Learner(method, make_model, dev, cfg, backend, ranks)
    if out is not None:
        ranks.from_main(lambda: outputs.prepare(out, remove))
    record = {
        "sequence": seq.name,
        "method": method,
        "backbone": backbone,
        "seed": seed,
        "device": str(dev),
        "backend": learner.spg.backend if learner.spg else None,
        "tasks": len(seq.tasks),
        "protocol": protocol,
        **asdict(cfg),
        "from_preset": from_preset,
        "world_size": ranks.world,
        "wrapper": ranks.wrapper,
    }
    identity = {k: v for k, v in record.items() if k not in NOT_COMPARED_ON_RESUME}
    resuming = mode == "resume" and out is not None
    finished = ranks.from_main(lambda: _finished(out)) if resuming else None
    if finished is not None:
        _check_same_run(out, finished["config"], record)
        return finished
    state = ranks.from_main(lambda: outputs.load_checkpoint(out)) if resuming else None
    done = {"matrix": [], "epochs": [], "train_s": [], "importance_s": [], "resumed_at": []}
    if state is not None:
        _check_same_run(out, state["identity"], identity)
        done = _restore(state, learner, generator, dev)
    n_tasks = len(seq.tasks)
    saved = len(done["matrix"])
    bar = Progress(
        f"{method} seed {seed} on {seq.name}",
        n_tasks,
        saved,
        progress if ranks.main else "none",
        out / "log.txt" if out is not None and ranks.main else None,
    )
    try:
        if state is not None:
            bar.line(
                f"resumed from {out / outputs.CHECKPOINT}: tasks 0..{saved - 1} of {n_tasks} done"
            )
        else:
            processes = f", {ranks.world} processes ({ranks.wrapper})" if ranks.world > 1 else ""
            bar.line(
                f"start: {backbone}, {parameter_count(probe):,} parameters per network, protocol "
                f"{protocol}{processes}, " + ", ".join(f"{k} {v}" for k, v in asdict(cfg).items())
            )
            for note in probe.notes:
                bar.line(note)
        for task in range(saved, n_tasks):
            model, optimizer = learner.start_task(task)
            ranks.seed_task(seed, task)
            start = time.perf_counter()
            done["epochs"].append(
                train_task(model, optimizer, task, seq, cfg, inputs, generator, bar.epoch)
            )
            done["train_s"].append(time.perf_counter() - start)
            done["importance_s"].append(learner.end_task(task, seq, inputs))
            done["matrix"].append([learner.test(j, seq, inputs) for j in range(task + 1)])
            if out is not None:
                _save(out, identity, learner, done, generator, dev)
                saved = task + 1
            bar.task(
                task,
                done["epochs"][-1],
                done["train_s"][-1],
                done["importance_s"][-1],
                done["matrix"][-1],
            )
    except KeyboardInterrupt:
        where = (
            f"tasks 0..{saved - 1} of {n_tasks} saved in {out / outputs.CHECKPOINT}"
            if saved
            else "no task saved"
        )
        bar.line(f"interrupted: {where}")
        raise RunInterrupted(f"interrupted {method} seed {seed} on {seq.name}: {where}") from None
    finally:
        bar.close()
    test_sizes = [len(t.test) for t in seq.tasks]
    result = {
        "sequence": seq.name,
        "method": method,
        "acc_matrix": done["matrix"],
        **summary(done["matrix"], test_sizes),
        "tasks": [t.name for t in seq.tasks],
        "test_sizes": test_sizes,
        "epochs": done["epochs"],
        "time_train_s": done["train_s"],
        "time_importance_s": done["importance_s"],
        "resumed_at_task": done["resumed_at"],
        "parameters": parameter_count(probe),
        "notes": probe.notes,
        "config": record,
        "data": {
            "data_dir": str(Path(data_dir).resolve()) if data_dir else None,
            "files": seq.files,
        },
        "versions": {
            "spg_fast": spg_fast.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "device": torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else platform.processor() or "cpu",
    }
    if out is not None:
        ranks.from_main(lambda: report.write_run(out, result))
    return result


def _finished(out: Path) -> dict[str, Any] | None:
    """The results of the finished run in ``out``, or None."""
    path = out / "results.json"
    return json.loads(path.read_text()) if path.exists() else None


def _check_list(name: str, values: tuple[Any, ...]) -> None:
    if not values:
        raise ValueError(f"{name}: give at least one")
    repeated = sorted({v for v in values if values.count(v) > 1}, key=str)
    if repeated:
        raise ValueError(f"{name}: {', '.join(map(str, repeated))} given more than once")


def compare(
    sequence: str = "digits",
    methods: tuple[str, ...] = METHODS,
    seeds: tuple[int, ...] = (0, 1, 2),
    *,
    out: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    **kwargs: Any,
) -> dict[str, Any]:
    """``run`` every method with every seed on the same sequence (into
    ``out/<method>-seed<seed>/``); returns (and, with ``out``, writes) the runs and a per-method
    summary (mean and standard deviation over seeds). ``resume=True`` skips finished runs and
    continues an interrupted one; on Ctrl-C the comparison of the runs finished so far is
    written (marked partial) before ``RunInterrupted`` is raised. Under torchrun every rank
    calls it (see ``run``)."""
    methods, seeds = tuple(methods), tuple(seeds)
    _check_list("methods", methods)
    _check_list("seeds", seeds)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; valid: {', '.join(METHODS)}")
    bad = [s for s in seeds if not isinstance(s, int) or isinstance(s, bool) or s < 0]
    if bad:
        raise ValueError(f"seeds: must be integers >= 0, got {', '.join(map(repr, bad))}")
    out = Path(out) if out is not None else None
    ranks = Ranks(kwargs.get("wrapper"), kwargs.get("device", "cpu"))
    if out is not None:
        mode = _mode(resume, overwrite)
        ranks.from_main(lambda: outputs.prepare(out, outputs.check(out, mode, compare=True)))
    planned = len(seeds) * len(methods)
    results: list[dict[str, Any]] = []
    try:
        for seed in seeds:
            for method in methods:
                sub = out / f"{method}-seed{seed}" if out is not None else None
                results.append(run(sequence, method, seed=seed, out=sub, resume=resume, **kwargs))
    except KeyboardInterrupt as e:
        if out is not None and results and ranks.main:
            rows = report.aggregate(results)
            report.write_comparison(out, results[0]["sequence"], results, rows, planned)
        what = e.message if isinstance(e, RunInterrupted) else "interrupted between runs"
        raise RunInterrupted(f"{what}; {len(results)} of {planned} runs finished") from None
    rows = report.aggregate(results)
    if out is not None:
        ranks.from_main(
            lambda: report.write_comparison(out, results[0]["sequence"], results, rows, planned)
        )
    return {"sequence": results[0]["sequence"], "runs": results, "summary": rows}
