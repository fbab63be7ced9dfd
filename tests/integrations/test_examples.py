"""The framework examples, run as a user runs them (slow): the single-process ones to the end, the
DDP ones on 2 gloo processes on the CPU, whose every rank must end each task with the same
importance, that of one process over all the data (within 1e-5), and mask AdamW's update."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from spg_fast import SPG

pytest.importorskip("lightning")
pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# Starting the processes and importing the frameworks takes most of a run (20-30 s alone on 2
# cores); other test jobs may share the cores.
TIMEOUT_S = 300


def run(*command: str | Path) -> str:
    """Run ``command`` with one thread per process; its output, or a failure showing it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, timeout=TIMEOUT_S, env=env
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    return result.stdout


def load(name: str) -> ModuleType:
    """The example ``examples/<name>.py`` as a module."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["lightning_continual", "transformers_continual_lm"])
def test_single_process_example_runs(name: str) -> None:
    output = run(sys.executable, EXAMPLES / f"{name}.py")
    assert "SPG" in output and "task 1" in output


def _ranks(out: Path) -> list[list[dict[str, Any]]]:
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def _check_ranks(ranks: list[list[dict[str, Any]]], reference, net_of) -> None:
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


def _protected(ranks: list[list[dict[str, Any]]]) -> float:
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


def test_lightning_ddp_example(tmp_path: Path) -> None:
    output = run(sys.executable, EXAMPLES / "lightning_ddp.py", "--out", tmp_path)
    assert "task 2: ended on 2 process(es)" in output
    example = load("lightning_ddp")
    ranks = _ranks(tmp_path)

    def net_of(params: dict[str, torch.Tensor]) -> torch.nn.Module:
        net = example.MultiHeadNet()
        net.load_state_dict(params)
        return net

    def reference(task: int, net: torch.nn.Module, before: dict | None) -> SPG:
        single = SPG(net, heads=net.heads)
        if before is not None:
            single.load_state_dict(before)
        single.end_task(task, DataLoader(example.task_data(task), batch_size=16))
        return single

    _check_ranks(ranks, reference, net_of)
    assert _protected(ranks) < 0.3
    for task in range(example.TASKS):  # the last checkpoint of each task holds it
        saved = torch.load(tmp_path / f"task{task}" / "last.ckpt", weights_only=True)
        state = saved["callbacks"]["SPGCallback"]
        assert state["ended"] is True and state["spg"]["tasks_finished"] == task + 1


def test_transformers_ddp_example(tmp_path: Path) -> None:
    output = run(
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        EXAMPLES / "transformers_ddp.py",
        "--out",
        tmp_path,
    )
    assert "task 1: ended on 2 process(es)" in output
    example = load("transformers_ddp")
    ranks = _ranks(tmp_path)

    def net_of(params: dict[str, torch.Tensor]) -> torch.nn.Module:
        model = example.tiny_llama()
        model.load_state_dict(params)
        return model

    def reference(task: int, model: torch.nn.Module, before: dict | None) -> SPG:
        from transformers import default_data_collator

        single = SPG(model)
        if before is not None:
            single.load_state_dict(before)
        data = example.task_data(task)
        batches = [default_data_collator(data[i : i + 8]) for i in range(0, len(data), 8)]
        single.end_task(
            task,
            batches,
            lambda batch: model(**batch).loss,
            loss_fn=lambda loss, _: loss,
            prepare_batch=lambda batch: (batch, None),
        )
        return single

    _check_ranks(ranks, reference, net_of)
    assert _protected(ranks) < 0.3
    for task in range(len(example.TASKS)):  # the last checkpoint of each task holds it
        last = max((tmp_path / f"task{task}").glob("checkpoint-*"), key=lambda p: int(p.name[11:]))
        state = torch.load(last / "spg_state.pt", weights_only=True)
        assert state["ended"] is True and state["spg"]["tasks_finished"] == task + 1
