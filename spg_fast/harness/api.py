"""The harness as a Python API: ``run`` one method on a task sequence, ``compare`` several over
seeds. Both check every argument and the output folder before training, checkpoint after every task,
resume, and stop cleanly on Ctrl-C (``RunInterrupted``, a ``KeyboardInterrupt``). Under torchrun
every rank calls them: the ranks train together (``spg_fast.harness.parallel``) and rank 0 alone
prints progress and writes the files."""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

import spg_fast
from spg_fast.harness import extras, methods, outputs, report
from spg_fast.harness.config import ConfigError, TrainConfig
from spg_fast.harness.health import DivergedError, exploded, first_nonfinite
from spg_fast.harness.methods import METHODS, MethodOptions
from spg_fast.harness.metrics import summary
from spg_fast.harness.metrics_files import MetricsFiles
from spg_fast.harness.models import BACKBONES, parameter_count
from spg_fast.harness.parallel import Ranks
from spg_fast.harness.progress import Progress
from spg_fast.harness.protocol import PROTOCOLS, resolve
from spg_fast.harness.sequences import EMBEDDED, TaskSequence, build_sequence
from spg_fast.harness.threads import choose as choose_threads
from spg_fast.harness.training import Inputs, Learner, model_factory, train_task

# What may differ between an interrupted run and its resumption: it does not define the experiment.
NOT_COMPARED_ON_RESUME = ("device", "backend", "from_preset", "world_size", "wrapper")


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``run`` or ``compare``; ``message`` says what was saved.

    Args:
        message: what was interrupted and what was saved.
    """

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
    settings: dict[str, Any],
    learner: Learner,
    done: dict[str, Any],
    generator: torch.Generator,
    dev: torch.device,
) -> None:
    """Checkpoint at the start and after every task: what defines the run (``identity``), the
    arguments it was started with (``settings``, which ``--resume`` reuses), the networks and the
    method's state, the results so far, the RNG states (rank 0's; the other ranks' streams are
    derived per task, ``Ranks.seed_task``). Every rank calls it; rank 0 writes."""
    state = {
        "identity": identity,
        "settings": settings,
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
) -> dict[str, Any]:
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
    options: MethodOptions | Mapping[str, Any] | None = None,
    backend: str = "auto",
    progress: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    tasks: int | None = None,
    wrapper: str | None = None,
    threads: int | None = None,
    tensorboard: bool = False,
) -> dict[str, Any]:
    """Learn the tasks of ``sequence`` in order with ``method``; returns (and, with ``out``, writes)
    the results: the accuracy matrix, metrics, the capacity used after every task
    (``importance_usage``), timings, the full config and the versions.

    ``config`` is a whole ``TrainConfig``, or a mapping of settings overriding ``protocol``'s
    preset (``quick`` or ``paper``); ``options`` the method's own settings (``MethodOptions``, or
    a mapping of some of them). With ``out``, a checkpoint is written when the run starts and after
    every task, and every epoch's metrics go to ``metrics.jsonl`` and ``metrics.csv``
    (``tensorboard=True``: also TensorBoard's files); ``resume=True`` continues the run there
    (same metrics as an uninterrupted run) and returns a finished run's results without training;
    ``overwrite=True`` replaces an earlier run there. ``progress``: ``auto``, ``bar``, ``lines``
    or ``none``. ``tasks`` learns only the sequence's first ``tasks`` tasks. ``threads``: torch's
    CPU threads for the run (default: ``spg_fast.harness.threads``'s rule).

    A non-finite training loss or weight stops the run; a task at chance accuracy after an
    exploding loss is flagged; either way the results say ``diverged`` and why.

    Under torchrun (the default process group initialised) every rank calls ``run`` with the same
    arguments and ``device`` its own (``cuda:LOCAL_RANK``): ``wrapper`` ``"ddp"`` (the default) or
    ``"fsdp"`` (FSDP2 ``fully_shard``); each rank trains on its share of every batch (the batch
    size must divide by the number of ranks). Rank 0 alone prints and writes; every rank returns
    the results. ``hat`` and ``ewc`` run in one process.

    Args:
        sequence: the task sequence: a name of ``SEQUENCES`` or a built ``TaskSequence``.
        method: the method, one of ``METHODS``.
        backbone: the network, one of ``BACKBONES`` (None: ``mlp`` for vector data, else
            ``alexnet``).
        seed: seeds the sequence's splits, the initial weights and the training order.
        device: the torch device to train on.
        out: the folder to write the run to (None: write nothing).
        data_dir: the folder holding the sequence's data files (None: see ``build_sequence``).
        protocol: the preset the settings not in ``config`` come from, one of ``PROTOCOLS``.
        config: a whole ``TrainConfig``, or settings overriding ``protocol``'s preset.
        options: the methods' own settings: a ``MethodOptions`` or some of its fields.
        backend: SPG's implementation, one of ``spg_fast.BACKENDS``.
        progress: how progress is shown: ``auto``, ``bar``, ``lines`` or ``none``.
        resume: continue the run in ``out``.
        overwrite: replace an earlier run in ``out``.
        tasks: learn only the sequence's first ``tasks`` tasks (None: all).
        wrapper: under torchrun, ``"ddp"`` or ``"fsdp"`` (None: ``ddp``).
        threads: torch's CPU threads for the run (None: ``spg_fast.harness.threads``'s rule).
        tensorboard: also write TensorBoard's files into ``out``.

    Returns:
        The results (as ``results.json`` holds them): ``acc_matrix``, the metrics (``acc``,
            ``bwt``, ``forgetting`` and their ``_weighted`` forms), ``diverged`` and
            ``divergence``, ``importance_usage``, the timings, ``config``, ``settings``,
            ``versions`` and more.

    Raises:
        ValueError: an unknown method, backbone, protocol or sequence, or a bad ``wrapper``.
        ConfigError: a setting out of range, ``tasks`` out of range, a batch size that does not
            split over the ranks, or ``tensorboard`` without ``out``.
        OutputError: ``out`` cannot be used as asked (``resume`` and ``overwrite`` together,
            ``resume`` without a run to continue, a folder holding other files).
        MissingExtraError: an optional package the run needs is not installed.
        DataError: the sequence's data files are missing or unreadable.
        RunInterrupted: Ctrl-C during the run.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if backbone is not None and backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; valid: {', '.join(BACKBONES)}")
    name = sequence.name if isinstance(sequence, TaskSequence) else sequence
    cfg, from_preset = _settings(protocol, name, config)
    opts = options if isinstance(options, MethodOptions) else MethodOptions(**(options or {}))
    dev = torch.device(device)
    ranks = Ranks(wrapper, dev)
    if cfg.batch_size % ranks.world:
        raise ConfigError(
            "batch_size",
            f"{cfg.batch_size} does not split evenly over {ranks.world} processes; give "
            f"a multiple of {ranks.world}",
        )
    out = Path(out) if out is not None else None
    if tensorboard and out is None:
        raise ConfigError("tensorboard", "writes into the output folder: give out=")
    if resume and out is None:
        raise outputs.OutputError("--resume: give --out, the folder of the run to continue")
    bar_mode = progress == "bar" or (progress == "auto" and sys.stderr.isatty())
    needed = (["sklearn"] if name in EMBEDDED else []) + (["matplotlib"] if out else [])
    extras.require(*needed, *(["tqdm"] if bar_mode and ranks.main else []))
    if tensorboard:
        extras.require_tensorboard()
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
    settings = {
        "sequence": seq.name,
        "method": method,
        "seed": seed,
        "backbone": backbone,
        "protocol": protocol,
        "config": asdict(config) if isinstance(config, TrainConfig) else dict(config or {}),
        "options": asdict(options) if isinstance(options, MethodOptions) else dict(options or {}),
        "tasks": tasks,
        "data_dir": str(Path(data_dir).resolve()) if data_dir else None,
    }
    backbone = backbone or default_backbone(seq)
    make_model = model_factory(backbone, seq, cfg)
    with torch.random.fork_rng(devices=[]):
        probe = methods.make(method, opts, backend).network(make_model())
    count, why = choose_threads(parameter_count(probe), threads)
    plan = _Plan(
        seq=seq,
        method=method,
        backbone=backbone,
        seed=seed,
        dev=dev,
        out=out,
        protocol=protocol,
        cfg=cfg,
        from_preset=from_preset,
        opts=opts,
        backend=backend,
        progress=progress,
        mode=mode,
        remove=remove,
        ranks=ranks,
        probe=probe,
        make_model=make_model,
        settings=settings,
        threads={"count": count, "why": why},
        tensorboard=tensorboard,
    )
    threads_before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        return _execute(plan)
    finally:
        torch.set_num_threads(threads_before)


@dataclass(frozen=True)
class _Plan:
    """A run with its arguments checked and resolved, its data read."""

    seq: TaskSequence
    method: str
    backbone: str
    seed: int
    dev: torch.device
    out: Path | None
    protocol: str
    cfg: TrainConfig
    from_preset: list[str]
    opts: MethodOptions
    backend: str
    progress: str
    mode: str
    remove: list[str]
    ranks: Ranks
    probe: torch.nn.Module
    make_model: Callable[[], torch.nn.Module]
    settings: dict[str, Any]
    threads: dict[str, Any]
    tensorboard: bool


def _execute(plan: _Plan) -> dict[str, Any]:
    """Train, checkpoint and report the run ``plan`` describes (the body of ``run``)."""
    seq, method, seed, dev, out, cfg = (
        plan.seq,
        plan.method,
        plan.seed,
        plan.dev,
        plan.out,
        plan.cfg,
    )
    ranks, opts, probe, threads = plan.ranks, plan.opts, plan.probe, plan.threads
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    inputs = Inputs(seq, cfg, dev, ranks)
    learner = Learner(method, plan.make_model, dev, cfg, plan.backend, ranks, opts)
    record = {
        "sequence": seq.name,
        "method": method,
        "backbone": plan.backbone,
        "seed": seed,
        "device": str(dev),
        "backend": learner.spg.backend if learner.spg else None,
        "tasks": len(seq.tasks),
        "protocol": plan.protocol,
        **asdict(cfg),
        **opts.for_method(method),
        "from_preset": plan.from_preset,
        "world_size": ranks.world,
        "wrapper": ranks.wrapper,
    }
    identity = {k: v for k, v in record.items() if k not in NOT_COMPARED_ON_RESUME}
    resuming = plan.mode == "resume" and out is not None
    finished = ranks.from_main(lambda: _finished(out)) if resuming else None
    if finished is not None:
        _check_same_run(out, finished["config"], record)
        return finished
    state = ranks.from_main(lambda: _checked_checkpoint(out)) if resuming else None
    done: dict[str, Any] = {
        "matrix": [],
        "epochs": [],
        "train_s": [],
        "importance_s": [],
        "task_s": [],
        "usage": [],
        "resumed_at": [],
        "divergence": None,
    }
    if state is not None:
        _check_same_run(out, state["identity"], identity)
        done = _restore(state, learner, generator, dev)
    elif out is not None:
        ranks.from_main(lambda: outputs.prepare(out, plan.remove))
        _save(out, identity, plan.settings, learner, done, generator, dev)
    n_tasks = len(seq.tasks)
    saved = len(done["matrix"])
    main = out is not None and ranks.main
    bar = Progress(
        f"{method} seed {seed} on {seq.name}",
        n_tasks,
        saved,
        plan.progress if ranks.main else "none",
        out / "log.txt" if main else None,
        cfg.max_epochs,
    )
    files = MetricsFiles(out, saved, plan.tensorboard) if main else None
    try:
        if state is not None:
            bar.line(
                f"resumed from {out / outputs.CHECKPOINT}: tasks 0..{saved - 1} of {n_tasks} done"
                if saved
                else f"resumed from {out / outputs.CHECKPOINT}: no task done yet"
            )
        else:
            processes = f", {ranks.world} processes ({ranks.wrapper})" if ranks.world > 1 else ""
            bar.line(
                f"start: {plan.backbone}, {parameter_count(probe):,} parameters per network, "
                f"protocol {plan.protocol}{processes}, {threads['count']} thread(s) "
                f"({threads['why']}), "
                + ", ".join(f"{k} {v}" for k, v in (asdict(cfg) | opts.for_method(method)).items())
            )
            for note in probe.notes:
                bar.line(note)
        for task in range(saved, n_tasks):
            started = time.perf_counter()
            model, optimizer = learner.start_task(task)
            ranks.seed_task(seed, task)
            losses: list[float] = []

            def on_epoch(info: dict[str, Any], losses: list[float] = losses) -> None:
                losses.append(info["train_loss"])
                bar.epoch(info)
                if files is not None:
                    files.epoch(info)

            def on_batch(done_: int, total: int, task: int = task, losses: list[float] = losses):
                bar.step(f"task {task} epoch {len(losses) + 1}", done_, total)

            try:
                epochs = train_task(
                    model,
                    optimizer,
                    task,
                    seq,
                    cfg,
                    inputs,
                    generator,
                    on_epoch,
                    method=learner.method,
                    on_batch=on_batch if bar.batches else None,
                )
            except DivergedError as e:
                done["divergence"] = {"task": e.task, "epoch": e.epoch, "why": e.why}
                bar.line(f"diverged in task {e.task} epoch {e.epoch}: {e.why}; run stopped")
                break
            done["epochs"].append(epochs)
            done["train_s"].append(time.perf_counter() - started)
            done["importance_s"].append(
                learner.end_task(task, seq, inputs, bar.step if bar.batches else None)
            )
            done["matrix"].append([learner.test(j, seq, inputs) for j in range(task + 1)])
            done["usage"].append(learner.usage())
            why = exploded(done["matrix"][-1][task], seq.tasks[task].n_classes, losses)
            if why and done["divergence"] is None:
                done["divergence"] = {"task": task, "epoch": None, "why": why}
                bar.line(f"diverged in task {task}: {why}")
            done["task_s"].append(time.perf_counter() - started)
            if out is not None:
                _save(out, identity, plan.settings, learner, done, generator, dev)
                saved = task + 1
            if files is not None:
                files.task(task, done["matrix"][-1], done["usage"][-1])
            left = n_tasks - task - 1
            bar.task(
                task,
                done["epochs"][-1],
                done["train_s"][-1],
                done["importance_s"][-1],
                done["matrix"][-1],
                done["usage"][-1],
                sum(done["task_s"]) / len(done["task_s"]) * left if left else None,
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
        if files is not None:
            files.close()
    test_sizes = [len(t.test) for t in seq.tasks]
    result = {
        "sequence": seq.name,
        "method": method,
        "acc_matrix": done["matrix"],
        **_metrics(done["matrix"], test_sizes),
        "diverged": done["divergence"] is not None,
        "divergence": done["divergence"],
        "importance_usage": done["usage"],
        "tasks": [t.name for t in seq.tasks],
        "test_sizes": test_sizes,
        "epochs": done["epochs"],
        "time_train_s": done["train_s"],
        "time_importance_s": done["importance_s"],
        "time_task_s": done["task_s"],
        "time_s": sum(done["task_s"]),
        "resumed_at_task": done["resumed_at"],
        "parameters": parameter_count(probe),
        "notes": probe.notes,
        "threads": threads,
        "config": record,
        "settings": plan.settings,
        "data": {"data_dir": plan.settings["data_dir"], "files": seq.files},
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


def _metrics(matrix: list[list[float]], test_sizes: list[int]) -> dict[str, float | None]:
    """The run's metrics; None each when no task finished (a run that diverged in its first)."""
    if not matrix:
        return dict.fromkeys(report.METRICS)
    return summary(matrix, test_sizes[: len(matrix)])


def _checked_checkpoint(out: Path) -> dict[str, Any]:
    """The checkpoint in ``out``, refused when any network holds a non-finite weight."""
    state = outputs.load_checkpoint(out)
    for i, net in enumerate(state["learner"]["models"]):
        bad = first_nonfinite(net.items())
        if bad is not None:
            raise outputs.OutputError(
                f"--resume: {out / outputs.CHECKPOINT} holds non-finite weights ({bad} of "
                f"network {i}); it cannot be continued"
            )
    return state


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
    summary (mean and standard deviation over seeds, diverged runs counted). ``out`` also gets
    ``settings.json``, the arguments, which ``spg-fast compare --resume`` reuses. ``resume=True``
    skips finished runs and continues interrupted ones; on Ctrl-C the comparison of the runs
    finished so far is written (marked partial) before ``RunInterrupted`` is raised. Under
    torchrun every rank calls it (see ``run``).

    Args:
        sequence: the task sequence, a name of ``SEQUENCES``.
        methods: the methods to run, each once (names of ``METHODS``).
        seeds: the seeds to run every method with, each once (integers >= 0).
        out: the folder to write the comparison to (None: write nothing).
        resume: continue the comparison in ``out``.
        overwrite: replace an earlier comparison in ``out``.
        **kwargs: further keyword arguments of ``run``, the same for every run.

    Returns:
        ``{"sequence": str, "runs": [...], "summary": [...]}``: every run's results (as ``run``
            returns them) and a row per method (mean and standard deviation over seeds of every
            metric and of the time, and the number of diverged runs).

    Raises:
        ValueError: ``methods`` or ``seeds`` empty or repeating a value, an unknown method, or a
            seed that is not an integer >= 0.
        OutputError: ``out`` cannot be used as asked (see ``run``, whose errors pass through).
        RunInterrupted: Ctrl-C during the comparison.
    """
    methods, seeds = tuple(methods), tuple(seeds)
    _check_list("methods", methods)
    _check_list("seeds", seeds)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; valid: {', '.join(METHODS)}")
    bad = [s for s in seeds if not isinstance(s, int) or isinstance(s, bool) or s < 0]
    if bad:
        raise ValueError(f"seeds: must be integers >= 0, got {', '.join(map(repr, bad))}")
    if resume and out is None:
        raise outputs.OutputError("--resume: give --out, the folder of the comparison to continue")
    out = Path(out) if out is not None else None
    ranks = Ranks(kwargs.get("wrapper"), kwargs.get("device", "cpu"))
    if out is not None:
        mode = _mode(resume, overwrite)
        settings = _compare_settings(sequence, methods, seeds, kwargs)

        def start() -> None:
            outputs.prepare(out, outputs.check(out, mode, compare=True))
            if mode != "resume":
                outputs.write_atomic(out / "settings.json", json.dumps(settings, indent=2) + "\n")

        ranks.from_main(start)
    planned = len(seeds) * len(methods)
    results: list[dict[str, Any]] = []
    try:
        for seed in seeds:
            for method in methods:
                sub = out / f"{method}-seed{seed}" if out is not None else None
                results.append(
                    run(sequence, method, seed=seed, out=sub, **_sub_mode(sub, resume), **kwargs)
                )
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


# The arguments of ``compare`` that define it, beside the sequence, methods and seeds.
COMPARE_SETTINGS = ("backbone", "protocol", "config", "options", "tasks", "data_dir")


def _compare_settings(
    sequence: str, methods: tuple[str, ...], seeds: tuple[int, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:
    """What ``settings.json`` records: the arguments that define the comparison, as JSON."""
    settings: dict[str, Any] = {
        "sequence": sequence,
        "methods": list(methods),
        "seeds": list(seeds),
    }
    for key in COMPARE_SETTINGS:
        value = kwargs.get(key)
        if isinstance(value, TrainConfig | MethodOptions):
            value = asdict(value)
        elif isinstance(value, Mapping):
            value = dict(value)
        elif isinstance(value, Path):
            value = str(value.resolve())
        settings[key] = value
    return settings


def _sub_mode(sub: Path | None, resume: bool) -> dict[str, bool]:
    """How a comparison's run folder is used: resumed when it holds a run, replaced when it holds
    only a run's first files (stopped before its first checkpoint), new otherwise."""
    if sub is None or not resume or not sub.is_dir():
        return {}
    if (sub / outputs.CHECKPOINT).exists() or (sub / "results.json").exists():
        return {"resume": True}
    return {"overwrite": True}
