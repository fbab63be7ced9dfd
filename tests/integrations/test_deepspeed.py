"""The Trainer callback under DeepSpeed ZeRO stages 1 and 2 (slow): refused before any step.

DeepSpeed steps flattened, partitioned copies of the parameters inside backward, where SPG's mask
cannot reach. It installs and runs on this CPU-only machine (its CPU accelerator, gloo), but not in
the project's environment: ``make test-deepspeed`` runs this file in one of its own. Each stage runs
in a process of its own under ``torchrun`` (the file is its own worker), as DeepSpeed and Accelerate
set up process-wide state.
"""

from __future__ import annotations

import sys

import pytest

from tests.integrations.examples import run

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_zero_is_refused_before_any_step(stage: int) -> None:
    pytest.importorskip("deepspeed")
    pytest.importorskip("transformers")
    output = run(
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "1",
        __file__,
        str(stage),
    )
    assert "refused before any step: DeepSpeed runs the optimizer step inside backward" in output


def _worker(stage: int) -> None:
    """Train the tiny Llama of the Trainer tests under DeepSpeed ZeRO ``stage`` with the callback;
    print the refusal and whether the weights stayed as they were."""
    import torch
    from transformers import Trainer, TrainingArguments

    from spg_fast import SPG
    from spg_fast.integrations.transformers import SPGCallback
    from tests.integrations.test_transformers import TASKS, _model

    model = _model(seed=0).float()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = {
        "zero_optimization": {"stage": stage},
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "zero_allow_untested_optimizer": True,
    }
    args = TrainingArguments(
        output_dir="/tmp/spg-deepspeed-test",
        per_device_train_batch_size=4,
        max_steps=2,
        deepspeed=config,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=TASKS[0], callbacks=[SPGCallback(SPG(model))]
    )
    try:
        trainer.train()
    except RuntimeError as error:
        unchanged = all(torch.equal(p, before[n]) for n, p in model.named_parameters())
        if unchanged:
            print(f"refused before any step: {str(error).split(': ', 1)[1]}")
        return
    print("trained: not refused")


if __name__ == "__main__":
    _worker(int(sys.argv[1]))
