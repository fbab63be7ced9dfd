"""SPG in the Hugging Face Trainer: continual fine-tuning of a tiny causal language model (a Llama
built from a config with random weights; nothing is downloaded) on two token-sequence tasks whose
next-token rules partly conflict, with and without SPG's callback. Runs on the CPU in seconds.

    pip install "spg-fast[transformers]"
    python examples/transformers_continual_lm.py
"""

from __future__ import annotations

import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PrinterCallback, Trainer, TrainingArguments
from transformers.utils import logging

from spg_fast import SPG
from spg_fast.integrations.transformers import SPGCallback

VOCAB, LENGTH = 32, 16
# Task k: sequences counting up by STRIDE within the tokens LOW..HIGH-1 (wrapping around); the two
# tasks share the tokens 8..23, where their next-token rules disagree.
TASKS = ((0, 24, 1), (8, 32, 5))  # (LOW, HIGH, STRIDE)
EPOCHS, LR = 4, 0.5


def task_data(task: int, examples: int, seed: int) -> list[dict[str, torch.Tensor]]:
    low, high, stride = TASKS[task]
    starts = torch.randint(
        0, high - low, (examples, 1), generator=torch.Generator().manual_seed(seed)
    )
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


def learn_sequence(use_spg: bool) -> list[list[float]]:
    """Train on each task in turn; returns L[i][j], the test loss on task j after learning
    task i."""
    model = tiny_llama()
    # No per-task heads: every parameter is shared, with an element-wise importance. The callback's
    # importance pass uses the model's own loss (model(**batch).loss), as the Trainer does.
    callbacks = [SPGCallback(SPG(model))] if use_spg else []
    tests = [task_data(k, 64, seed=100 + k) for k in range(len(TASKS))]
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for task in range(len(TASKS)):
            args = TrainingArguments(
                output_dir=out,
                per_device_train_batch_size=32,
                num_train_epochs=EPOCHS,
                learning_rate=LR,
                lr_scheduler_type="constant",
                optim="sgd",
                save_strategy="no",
                logging_strategy="no",
                report_to="none",
                disable_tqdm=True,
                use_cpu=True,
                seed=task,
            )
            trainer = Trainer(
                model=model,
                args=args,
                train_dataset=task_data(task, 128, seed=task),
                callbacks=callbacks,
            )
            trainer.remove_callback(PrinterCallback)  # keep the output to the table below
            trainer.train()  # one train() = one task: SPG measures it when training ends
            rows.append([trainer.evaluate(tests[j])["eval_loss"] for j in range(task + 1)])
    return rows


def main() -> None:
    logging.set_verbosity_error()
    for name, use_spg in (("fine-tuning", False), ("SPG", True)):
        rows = learn_sequence(use_spg)
        print(f"\n{name}: test loss on task j (columns) after learning task i (rows)")
        for i, row in enumerate(rows):
            print(f"  task {i}  " + "  ".join(f"{loss:.3f}" for loss in row))


if __name__ == "__main__":
    main()
