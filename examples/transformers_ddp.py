"""SPG in the Hugging Face Trainer under DDP: continual fine-tuning of a tiny causal language model
(a Llama built from a config with random weights; nothing is downloaded) on two token-sequence
tasks, with the Trainer's default AdamW, on several processes. Each process trains and measures its
share of every task's data (Accelerate shards the dataloader); the callback adds the importance
pass's gradient sums over the processes, so every process ends each task with the importance of all
the data. Runs on the CPU (gloo) in under a minute.

    pip install "spg-fast[transformers]"
    torchrun --nproc-per-node 2 examples/transformers_ddp.py
    python examples/transformers_ddp.py --batch-size 16     # the same run, one process

``--out DIR`` also writes, per process, what a test compares: SPG's state and the weights after
each task (``DIR/rank<r>.pt``) and each task's checkpoint folders
(``DIR/task<k>/checkpoint-<step>``).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PrinterCallback, Trainer, TrainingArguments
from transformers.utils import logging

from spg_fast import SPG
from spg_fast.integrations.transformers import SPGCallback

VOCAB, LENGTH, EXAMPLES, EPOCHS = 32, 16, 64, 2
TASKS = (
    (0, 24, 1),
    (8, 32, 5),
)  # (LOW, HIGH, STRIDE): sequences counting up by STRIDE in LOW..HIGH


def task_data(task: int) -> list[dict[str, torch.Tensor]]:
    """Task ``task``'s training sequences, from seeded random starts."""
    low, high, stride = TASKS[task]
    g = torch.Generator().manual_seed(task)
    starts = torch.randint(0, high - low, (EXAMPLES, 1), generator=g)
    ids = low + (starts + stride * torch.arange(LENGTH)) % (high - low)
    return [{"input_ids": row, "labels": row} for row in ids]


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=LENGTH,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8, help="per process")
    parser.add_argument("--out", type=Path, help="where to write what a test compares")
    args = parser.parse_args()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    torch.set_num_threads(1)

    model = tiny_llama()
    # SPG on the plain model, as on one process: the Trainer wraps it in DDP itself. No per-task
    # heads: every parameter is shared.
    spg = SPG(model)
    callback = SPGCallback(spg)  # the default AdamW: masked on its update (mask="auto")
    root = args.out or Path(tempfile.mkdtemp())
    results = []
    for task in range(len(TASKS)):
        training = TrainingArguments(
            output_dir=str(root / f"task{task}"),  # one per task: each train() counts from step 0
            per_device_train_batch_size=args.batch_size,
            num_train_epochs=EPOCHS,
            learning_rate=3e-3,
            save_strategy="epoch",
            logging_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=True,
            ddp_find_unused_parameters=False,  # a language model uses every parameter
            seed=task,
        )
        trainer = Trainer(
            model=model, args=training, train_dataset=task_data(task), callbacks=[callback]
        )
        trainer.remove_callback(PrinterCallback)
        trainer.train()  # one train() = one task: SPG measures it when training ends
        results.append(
            {
                "spg": copy.deepcopy(spg.state_dict()),  # SPG's own tensors: copied
                "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            }
        )
        if trainer.is_world_process_zero():
            usage = spg.usage()
            print(
                f"task {task}: ended on {training.world_size} process(es); mean importance "
                f"{usage.mean:.3f}, {usage.above_0_9:.1%} of elements above 0.9"
            )
    if args.out:
        torch.save(results, args.out / f"rank{training.process_index}.pt")


if __name__ == "__main__":
    main()
