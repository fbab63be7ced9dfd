"""The framework examples, run as a user runs them (slow): the single-process ones to the end, the
DDP ones (and Lightning's under FSDP2) on 2 gloo processes on the CPU, whose every rank must end
each task with the same importance, that of one process over all the data (within 1e-5), and mask
AdamW's update."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from spg_fast import SPG
from tests.integrations.examples import (
    EXAMPLES,
    check_multihead_example,
    check_ranks,
    load,
    protected,
    ranks_of,
    run,
    torchrun,
)

pytest.importorskip("lightning")
pytest.importorskip("transformers")

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["lightning_continual", "transformers_continual_lm"])
def test_single_process_example_runs(name: str) -> None:
    output = run(sys.executable, EXAMPLES / f"{name}.py")
    assert "SPG" in output and "task 1" in output


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_lightning_ddp_example(tmp_path: Path, strategy: str) -> None:
    options = ["--fsdp2"] if strategy == "fsdp2" else []
    output = run(sys.executable, EXAMPLES / "lightning_ddp.py", *options, "--out", tmp_path)
    assert "task 2: ended on 2 process(es)" in output
    example = load("lightning_ddp")
    ranks = ranks_of(tmp_path)
    check_multihead_example(ranks, example, batch=16)
    assert protected(ranks) < 0.3
    for task in range(example.TASKS):  # the last checkpoint of each task holds it
        last = tmp_path / f"task{task}" / "last.ckpt"  # FSDP2: a folder, the shards and meta.pt
        saved = torch.load(last / "meta.pt" if last.is_dir() else last, weights_only=True)
        state = saved["callbacks"]["SPGCallback"]
        assert state["ended"] is True and state["spg"]["tasks_finished"] == task + 1


def test_transformers_ddp_example(tmp_path: Path) -> None:
    output = torchrun("transformers_ddp", "--out", tmp_path)
    assert "task 1: ended on 2 process(es)" in output
    example = load("transformers_ddp")
    ranks = ranks_of(tmp_path)

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

    check_ranks(ranks, reference, net_of)
    assert protected(ranks) < 0.3
    for task in range(len(example.TASKS)):  # the last checkpoint of each task holds it
        last = max((tmp_path / f"task{task}").glob("checkpoint-*"), key=lambda p: int(p.name[11:]))
        state = torch.load(last / "spg_state.pt", weights_only=True)
        assert state["ended"] is True and state["spg"]["tasks_finished"] == task + 1
