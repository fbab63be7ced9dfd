"""The harness under torchrun: 2 gloo processes on the CPU give one process's results (same accuracy
matrices and epochs, networks and importance within float rounding), rank 0 alone prints and writes,
a rank-0 failure stops every rank with one clear error, and the options' errors come before anything
starts. A hang fails at the timeout.

Two launches cover the three methods with DDP and with FSDP2: ``python -m torch.distributed.run``
continuing a one-process comparison interrupted in spg's second task (resuming under torchrun), and
``--nproc 2 --fsdp``."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from spg_fast import cli
from spg_fast.harness import TrainConfig, api, run
from spg_fast.harness import training as tr
from spg_fast.harness.methods.spg import _share_loss
from spg_fast.harness.outputs import RUN_FILES, load_checkpoint
from spg_fast.harness.parallel import Ranks
from spg_fast.harness.sequences import build_sequence

METHODS = ("spg", "finetune", "one")
COMPARE = [
    "compare",
    "--methods",
    ",".join(METHODS),
    "--seeds",
    "0",
    "--tasks",
    "2",
    "--max-epochs",
    "2",
]
# Importing torch, scikit-learn and matplotlib in each process takes most of a launch (about 9 s
# on 2 cores).
TIMEOUT_S = 90
# Float rounding only: each rank sums its half of a batch's gradient and the ranks' halves are
# added, where one process sums the whole batch at once. Measured over these runs: networks at
# most 1.5e-8 apart (2 float32 ulps at their magnitudes, below 0.25), importance at most 4.5e-7; the
# issue's bound for the importance is 1e-6.
WEIGHTS_ATOL = 1e-7
IMPORTANCE_ATOL = 1e-6
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python argv`` in ``cwd`` with one torch thread per process; every process it started is
    killed at the timeout, which fails the test."""
    cwd.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, *argv],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{argv} hung: no exit after {TIMEOUT_S} s\n{err[-4000:]}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return _launch(
        [
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(_free_port()),
            "-m",
            "spg_fast.cli",
            *args,
        ],
        cwd,
    )


def _interrupted_in_spgs_second_task(out: Path) -> None:
    """The comparison in one process, stopped by Ctrl-C in spg's task 1 (spg's
    task 0 checkpointed)."""
    real, calls = api.train_task, []

    def train(*args: Any, **kwargs: Any) -> int:
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(api, "train_task", train)
        assert cli.main([*COMPARE, "--out", str(out)]) == 130


@pytest.fixture(scope="module")
def launches(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One process's comparison, and the same under DDP (resumed) and FSDP2, each in its own
    working folder."""
    root = tmp_path_factory.mktemp("harness")
    assert cli.main([*COMPARE, "--out", str(root / "single")]) == 0
    ddp = root / "ddp"
    _interrupted_in_spgs_second_task(ddp / "out")
    done = {
        "ddp": _torchrun([*COMPARE, "--out", "out", "--resume"], ddp),
        "fsdp": _launch(
            ["-m", "spg_fast.cli", *COMPARE, "--nproc", "2", "--fsdp", "--out", "out"],
            root / "fsdp",
        ),
    }
    return {"root": root, **done}


def _results(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    result = json.loads((folder / "results.json").read_text())
    return result, load_checkpoint(folder)["learner"]


def _tensors(state: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a nested state (dicts and lists), by path."""
    if isinstance(state, torch.Tensor):
        return {prefix: state}
    items = state.items() if isinstance(state, dict) else enumerate(state or [])
    out: dict[str, torch.Tensor] = {}
    for key, value in items:
        if isinstance(value, dict | list | torch.Tensor):
            out.update(_tensors(value, f"{prefix}/{key}"))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
def test_two_processes_give_one_processs_results(
    launches: dict[str, Any], wrapper: str, method: str
) -> None:
    launched = launches[wrapper]
    assert launched.returncode == 0, launched.stderr[-4000:]
    folder = launches["root"] / wrapper / "out" / f"{method}-seed0"
    result, learner = _results(folder)
    single, single_learner = _results(launches["root"] / "single" / f"{method}-seed0")
    assert result["acc_matrix"] == single["acc_matrix"]
    assert result["epochs"] == single["epochs"]  # the same validation decisions
    assert result["config"]["world_size"] == 2 and result["config"]["wrapper"] == wrapper
    assert single["config"]["world_size"] == 1 and single["config"]["wrapper"] is None
    assert result["resumed_at_task"] == ([1] if (wrapper, method) == ("ddp", "spg") else [])
    assert len(learner["models"]) == len(single_learner["models"]) == (2 if method == "one" else 1)
    for net, one in zip(learner["models"], single_learner["models"], strict=True):
        assert net.keys() == one.keys()
        for name, value in net.items():
            assert type(value) is torch.Tensor  # whole tensors, also from FSDP2's shards
            torch.testing.assert_close(value, one[name], rtol=0, atol=WEIGHTS_ATOL, msg=name)
    if method == "spg":  # SPG's stored importance, whatever its format
        stored, single_stored = _tensors(learner["method"]), _tensors(single_learner["method"])
        assert stored.keys() == single_stored.keys() and stored
        for name, a in stored.items():
            assert a.is_floating_point() or a.dtype == torch.uint8, name
            torch.testing.assert_close(
                a.double(), single_stored[name].double(), rtol=0, atol=IMPORTANCE_ATOL, msg=name
            )


@pytest.mark.slow
@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
def test_only_rank_0_prints_and_writes(launches: dict[str, Any], wrapper: str) -> None:
    launched = launches[wrapper]
    assert launched.returncode == 0, launched.stderr[-4000:]
    work = launches["root"] / wrapper
    assert sorted(p.name for p in work.iterdir()) == [
        "out"
    ]  # no other rank's default folder or stray file
    assert (
        launched.stdout.count("wrote out/") == 1
        and launched.stdout.count("| method | seeds |") == 1
    )
    launched_epochs = 0
    for method in METHODS:
        folder = work / "out" / f"{method}-seed0"
        assert {p.name for p in folder.iterdir()} == RUN_FILES
        lines = [TIMESTAMP.sub("", line) for line in (folder / "log.txt").read_text().splitlines()]
        assert len(lines) == len(set(lines))  # every line once
        epochs = json.loads((folder / "results.json").read_text())["epochs"]
        assert len([line for line in lines if " epoch " in line]) == sum(epochs)
        # ddp continued spg after its task 0, which the one-process run had trained and logged
        launched_epochs += sum(epochs[1:] if (wrapper, method) == ("ddp", "spg") else epochs)
    assert f"2 processes ({wrapper})" in (work / "out" / "one-seed0" / "log.txt").read_text()
    printed = [
        line for line in launched.stderr.splitlines() if re.search(r": task \d of 2 epoch \d", line)
    ]
    assert len(printed) == launched_epochs


@pytest.mark.slow
def test_a_failure_on_rank_0_stops_every_rank_with_one_error(tmp_path: Path) -> None:
    """--out is checked by rank 0 alone; the other rank learns of its error instead of waiting in
    a collective."""
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    launched = _launch(["-m", "spg_fast.cli", "run", "--nproc", "2", "--out", "taken"], tmp_path)
    assert launched.returncode == 2, launched.stderr[
        -4000:
    ]  # --nproc passes on the processes' exit code
    errors = [line for line in launched.stderr.splitlines() if line.startswith("spg-fast: error:")]
    assert (
        errors
        == [
            "spg-fast: error: --out: taken holds files spg-fast did not write (notes.txt); choose "
            "a new or empty folder"
        ]
        * 2
    )  # each rank says why it stopped
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_each_rank_takes_its_contiguous_share_of_every_batch() -> None:
    """The ranks' shares make up each batch, and their loss weights make DDP's average the batch's
    mean loss; a batch smaller than the number of ranks leaves a rank an empty share, whose loss
    is 0."""
    seq = build_sequence("digits", seed=0)
    split = seq.tasks[1].train  # 227 samples: batches of 113 and 1 with batch size 226
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig()
    one = list(tr.Inputs(seq, cfg, torch.device("cpu")).shares(split, 226, order))
    shares = []
    for rank in range(2):
        ranks = Ranks()
        ranks.world, ranks.rank = 2, rank
        shares.append(
            list(tr.Inputs(seq, cfg, torch.device("cpu"), ranks).shares(split, 226, order))
        )
    assert [len(y) for _, y, _ in one] == [226, 1]
    assert [[len(y) for _, y, _ in mine] for mine in shares] == [[113, 1], [113, 0]]
    logits = torch.randn(len(split), 3, dtype=torch.float64)
    for b, (x, y, per_rank) in enumerate(one):
        assert per_rank == len(y)
        assert torch.equal(torch.cat([mine[b][0] for mine in shares]), x)
        assert torch.equal(torch.cat([mine[b][1] for mine in shares]), y)
        start = 226 * b
        mean = torch.nn.functional.cross_entropy(logits[start : start + len(y)], y)
        averaged = (
            sum(
                _share_loss(
                    logits[start + 113 * r : start + 113 * r + len(mine[b][1])],
                    (mine[b][1], mine[b][2]),
                )
                for r, mine in enumerate(shares)
            )
            / 2
        )
        torch.testing.assert_close(averaged, mean, rtol=1e-15, atol=0)


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as stopped:
        cli.main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.strip()


def test_fsdp_needs_several_processes(capsys: pytest.CaptureFixture[str]) -> None:
    assert _error(["run", "--fsdp"], capsys) == (
        "spg-fast: error: --fsdp: shards the network over several "
        "processes: launch with torchrun --nproc-per-node N, or pass "
        "--nproc N"
    )
    with pytest.raises(
        ValueError, match=r"wrapper='fsdp' needs several processes: launch with torchrun"
    ):
        run("digits", wrapper="fsdp", tasks=1, progress="none")
    with pytest.raises(ValueError, match=r"wrapper must be None, ddp or fsdp, got 'zero'"):
        run("digits", wrapper="zero", tasks=1, progress="none")


@pytest.mark.parametrize("launched", [None, "2"])
def test_batch_size_must_split_evenly_over_the_processes(
    launched: str | None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Checked before anything starts: under torchrun (its WORLD_SIZE), or with --nproc before
    the launch."""
    if launched is None:
        argv = ["run", "--nproc", "2", "--batch-size", "63"]
    else:
        monkeypatch.setenv("WORLD_SIZE", launched)
        argv = ["run", "--batch-size", "63"]
    assert _error(argv, capsys) == (
        "spg-fast: error: --batch-size: 63 does not split evenly over 2 processes; give "
        "a multiple of 2"
    )
