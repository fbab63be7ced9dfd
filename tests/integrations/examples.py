"""Running the examples as a user runs them, for the slow tests."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
# Starting the processes and importing the frameworks takes most of a run (20-60 s alone on 2
# cores); other test jobs may share the cores.
TIMEOUT_S = 300


def run(*command: str | Path, timeout: float = TIMEOUT_S) -> str:
    """Run ``command`` with one thread per process and the repository importable (``tests``);
    its standard output, or an assertion error showing all its output."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
    result = subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    return result.stdout


def torchrun(script: str, *args: str | Path, processes: int = 2) -> str:
    """``examples/<script>.py`` under ``torchrun --standalone`` (a free port)."""
    import sys

    return run(
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(processes),
        EXAMPLES / f"{script}.py",
        *args,
    )


def load(name: str) -> ModuleType:
    """The example ``examples/<name>.py`` as a module."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ranks_of(out: Path) -> list[list[dict[str, Any]]]:
    """What each of the 2 ranks of an example wrote (``out/rank<r>.pt``)."""
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def check_ranks(ranks: list[list[dict[str, Any]]], reference, net_of) -> None:
    """Both ranks hold the same weights and SPG state after each task, and the importance equals
    ``reference(task, net, state before the task)`` within 1e-5."""
    first, second = ranks
    for task, (mine, theirs) in enumerate(zip(first, second, strict=True)):
        for name, p in mine["params"].items():
            assert torch.equal(p, theirs["params"][name]), (task, name)
        assert mine["spg"]["tasks_finished"] == task + 1
        for name, k in mine["spg"]["keep"].items():
            assert torch.equal(k, theirs["spg"]["keep"][name]), (task, name)
        net = net_of(mine["params"])
        single = reference(task, net, first[task - 1]["spg"] if task else None)
        got = {n: 1 - k.double() for n, k in mine["spg"]["keep"].items()}
        diff = max(float((got[n] - a.double()).abs().max()) for n, a in single.importance.items())
        assert diff <= 1e-5, (task, diff)


def protected(ranks: list[list[dict[str, Any]]]) -> float:
    """Over task 1, the mean distance moved by the shared elements task 0 made important
    (A > 0.9) over that moved by those it left free (A < 0.1): AdamW's update masked moves the
    first about (1 - A) as far."""
    after0, after1 = ranks[0][0], ranks[0][1]
    moved = {"high": [0.0, 0], "low": [0.0, 0]}
    for name, k in after0["spg"]["keep"].items():
        a = 1 - k.double()
        change = (after1["params"][name] - after0["params"][name]).abs().double()
        for key, where in (("high", a > 0.9), ("low", a < 0.1)):
            moved[key][0] += float(change[where].sum())
            moved[key][1] += int(where.sum())
    assert moved["high"][1] >= 10 and moved["low"][1] >= 10, moved
    return (moved["high"][0] / moved["high"][1]) / (moved["low"][0] / moved["low"][1])


def check_multihead_example(
    ranks: list[list[dict[str, Any]]], example: ModuleType, batch: int
) -> None:
    """``check_ranks`` for an example whose network is ``example.MultiHeadNet`` (its heads in
    ``heads``) and whose task data is ``example.task_data(task)``, one process measuring over all
    of it in batches of ``batch``."""
    from torch.utils.data import DataLoader

    from spg_fast import SPG

    def net_of(params: dict[str, torch.Tensor]) -> torch.nn.Module:
        net = example.MultiHeadNet()
        net.load_state_dict(params)
        return net

    def reference(task: int, net: torch.nn.Module, before: dict | None) -> SPG:
        single = SPG(net, heads="heads")
        if before is not None:
            single.load_state_dict(before)
        single.end_task(task, DataLoader(example.task_data(task), batch_size=batch))
        return single

    check_ranks(ranks, reference, net_of)
