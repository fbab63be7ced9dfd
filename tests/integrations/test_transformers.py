"""The Hugging Face Trainer callback with the real library: a tiny randomly initialised Llama (built
from a config, nothing downloaded) trained on two token-sequence tasks on the CPU; the masked
gradients checked against an unmasked run, the importance pass against SPG.end_task with the model's
own loss, and SPG's state through checkpoint folders."""

from __future__ import annotations

import copy
import gc
import shutil

import pytest
import torch
import torch.nn.functional as F

from spg_fast import SPG

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)

from spg_fast.integrations.transformers import STATE_FILE, SPGCallback  # noqa: E402
from tests.integrations.recording import RecordingSGD  # noqa: E402

VOCAB, LENGTH, EXAMPLES, BATCH = 16, 8, 16, 4
STEPS = EXAMPLES // BATCH  # one epoch


@pytest.fixture(scope="module", autouse=True)
def _objects_alive_now_skip_collection():
    """Accelerate runs gc.collect() at the start of every train(); with torch and the frameworks
    loaded, one full collection took 0.4 s of a 0.5 s train() here. Objects alive now are left out
    of collections in this module."""
    gc.freeze()
    yield
    gc.unfreeze()


def _model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=LENGTH,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).double()


def _task(stride: int) -> list[dict[str, torch.Tensor]]:
    """Sequences counting up by ``stride`` modulo the vocabulary from seeded random starts: a
    next-token rule per task, so the two tasks conflict."""
    starts = torch.randint(0, VOCAB, (EXAMPLES, 1), generator=torch.Generator().manual_seed(stride))
    ids = (starts + stride * torch.arange(LENGTH)) % VOCAB
    return [{"input_ids": row, "labels": row} for row in ids]


TASKS = [_task(1), _task(3)]


def _spg(model: LlamaForCausalLM) -> SPG:
    # A language model has no per-task heads: every parameter is shared (the LM head too).
    return SPG(model)


def _train(
    model,
    task,
    out,
    callbacks=(),
    resume=None,
    wrap_with=None,
    trainer_class=Trainer,
    optimizer="sgd",
    eval_dataset=None,
    **args,
) -> list[dict[str, torch.Tensor]]:
    """Train ``model`` on ``task`` with SGD (or, for ``optimizer=None``, the Trainer's default
    AdamW); returns the gradients every SGD step saw."""
    sgd = RecordingSGD(model, lr=0.5) if optimizer == "sgd" else None
    arguments = TrainingArguments(
        **{
            "output_dir": str(out),
            "per_device_train_batch_size": BATCH,
            "num_train_epochs": 1,
            "lr_scheduler_type": "constant",
            "max_grad_norm": 0.0,
            "train_sampling_strategy": "sequential",
            "report_to": "none",
            "logging_strategy": "no",
            "save_strategy": "no",
            "disable_tqdm": True,
            "use_cpu": True,
            "seed": 0,
            **args,
        }
    )
    trainer = trainer_class(
        model=model,
        args=arguments,
        train_dataset=task,
        eval_dataset=eval_dataset,
        callbacks=list(callbacks),
        optimizers=(wrap_with.wrap(sgd) if wrap_with else sgd, None),
    )
    trainer.train(resume_from_checkpoint=resume)
    return sgd.seen if sgd is not None else []


def _twin(model: LlamaForCausalLM, spg: SPG) -> tuple[LlamaForCausalLM, SPG]:
    twin = copy.deepcopy(model)
    twin_spg = _spg(twin)
    twin_spg.load_state_dict(spg.state_dict())
    return twin, twin_spg


@pytest.fixture(scope="module")
def task0_run(tmp_path_factory):
    """Task 0 trained with the callback, a checkpoint folder every 2 steps: (model, spg, output
    folder)."""
    model = _model(seed=0)
    spg = _spg(model)
    out = tmp_path_factory.mktemp("task0")
    _train(model, TASKS[0], out, [SPGCallback(spg)], save_strategy="steps", save_steps=2)
    return model, spg, out


@pytest.fixture(scope="module")
def after_task0(task0_run):
    return task0_run[:2]


def test_train_ends_the_task_with_the_models_own_loss(after_task0):
    model, spg = after_task0
    assert spg.tasks_finished == 1
    oracle_model = copy.deepcopy(model)
    oracle = _spg(oracle_model)
    batches = [default_data_collator(TASKS[0][i : i + BATCH]) for i in range(0, EXAMPLES, BATCH)]
    oracle.end_task(
        0,
        batches,
        lambda batch: oracle_model(**batch).loss,
        loss_fn=lambda loss, _: loss,
        prepare_batch=lambda batch: (batch, None),
    )
    assert spg.importance.keys() == oracle.importance.keys()
    for name, a in oracle.importance.items():
        assert torch.equal(spg.importance[name], a), name
    assert max(float(a.max()) for a in spg.importance.values()) > 0.9


def test_task_two_is_masked_once_right_before_each_step(after_task0, tmp_path):
    model, spg = after_task0
    masked, masked_spg = _twin(model, spg)
    control = copy.deepcopy(model)
    seen_masked = _train(
        masked, TASKS[1], tmp_path / "masked", [SPGCallback(masked_spg, mask="gradient")]
    )
    seen_control = _train(control, TASKS[1], tmp_path / "control")
    assert len(seen_masked) == len(seen_control) == STEPS

    # Same weights at the first step: the optimizer sees exactly the unmasked gradient times 1 - A,
    # masked once.
    assert seen_masked[0].keys() == seen_control[0].keys() == {*spg.importance}
    assert "lm_head.weight" in spg.importance
    for name, g in seen_control[0].items():
        assert torch.equal(seen_masked[0][name], g * spg.keep_factors[name]), name

    # Over the task, the weights task 0 relies on most (A > 0.9) move far less than without
    # the callback.
    with torch.no_grad():
        start = dict(model.named_parameters())
        high = {n: a > 0.9 for n, a in spg.importance.items()}
        moved = [
            sum(
                float((dict(m.named_parameters())[n] - start[n])[h].abs().sum())
                for n, h in high.items()
            )
            for m in (masked, control)
        ]
    assert sum(int(h.sum()) for h in high.values()) >= 10
    assert moved[0] < 0.1 * moved[1]


@pytest.fixture(scope="module")
def task1_checkpointed(after_task0, tmp_path_factory):
    """Task 1 trained with the callback, a checkpoint folder every 2 steps: (model, spg,
    output folder)."""
    run, run_spg = _twin(*after_task0)
    out = tmp_path_factory.mktemp("task1")
    _train(run, TASKS[1], out, [SPGCallback(run_spg)], save_strategy="steps", save_steps=2)
    return run, run_spg, out


@pytest.mark.parametrize("resume_step", [2, STEPS])
def test_a_checkpoint_folder_restores_spg_state_and_the_run_continues_identically(
    after_task0, task1_checkpointed, resume_step
):
    _, spg = after_task0
    run, run_spg, out = task1_checkpointed
    assert run_spg.tasks_finished == 2
    folder = out / f"checkpoint-{resume_step}"
    saved = torch.load(folder / STATE_FILE, weights_only=True)
    # The last checkpoint of the task was written again once the task had ended: it holds task 1.
    last = resume_step == STEPS
    assert saved["global_step"] == resume_step and saved["spg"]["tasks_finished"] == 1 + last
    assert saved["ended"] is last and saved["over"] is last
    expected = run_spg if last else spg
    for name, k in expected.keep_factors.items():
        assert torch.equal(saved["spg"]["keep"][name], k), name

    # Fresh weights and a fresh SPG: everything comes from the checkpoint folder. From step 2 the
    # last steps train with the restored masks; from the last step only the task ends.
    resumed = _model(seed=1)
    resumed_spg = _spg(resumed)
    _train(resumed, TASKS[1], out, [SPGCallback(resumed_spg)], resume=str(folder))
    assert resumed_spg.tasks_finished == 2
    for name, a in run_spg.importance.items():
        assert torch.equal(resumed_spg.importance[name], a), name
    for (name, p), q in zip(run.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_resuming_without_spg_state_or_an_already_masked_optimizer_is_refused(
    after_task0, task1_checkpointed, tmp_path
):
    model, spg = after_task0
    _, _, out = task1_checkpointed
    without = tmp_path / "without"
    shutil.copytree(out / "checkpoint-2", without / "checkpoint-2")
    (without / "checkpoint-2" / STATE_FILE).unlink()
    fresh = _model(seed=1)
    with pytest.raises(
        FileNotFoundError, match=f"resumed at step 2 but .*checkpoint-2/{STATE_FILE} does not exist"
    ):
        _train(fresh, TASKS[1], without, [SPGCallback(_spg(fresh))], resume=True)

    twin, twin_spg = _twin(model, spg)
    with pytest.raises(RuntimeError, match="is already masked through an SPG object"):
        _train(twin, TASKS[1], tmp_path / "wrapped", [SPGCallback(twin_spg)], wrap_with=twin_spg)


def _oracle(model, spg, task: int, examples) -> SPG:
    """A copy of ``model`` with ``spg``'s state that ended ``task`` over ``examples`` with the
    model's own loss, as the callback does."""
    twin, twin_spg = _twin(model, spg)
    batches = [default_data_collator(examples[i : i + BATCH]) for i in range(0, EXAMPLES, BATCH)]
    twin_spg.end_task(
        task,
        batches,
        lambda batch: twin(**batch).loss,
        loss_fn=lambda loss, _: loss,
        prepare_batch=lambda batch: (batch, None),
    )
    return twin_spg


def test_the_next_task_resumes_from_the_last_checkpoint_of_the_task_before(task0_run, tmp_path):
    """The last checkpoint of task 0 holds task 0's importance: a run resumed from it for task 1
    trains task 1 protected from its first step and ends task 1 on task 1's data."""
    model, spg, out = task0_run
    last = out / f"checkpoint-{STEPS}"
    start = {n: p.detach().clone() for n, p in model.named_parameters()}  # the checkpoint's
    control = copy.deepcopy(model)
    tracks = [_Parameters(control)]
    _train(control, TASKS[1], tmp_path / "control", tracks, max_steps=1)  # task 1 unprotected

    resumed = _model(seed=1)
    resumed_spg = _spg(resumed)
    tracks.append(_Parameters(resumed))
    _train(
        resumed,
        TASKS[1],
        tmp_path / "task1",
        [SPGCallback(resumed_spg), tracks[1]],
        resume=str(last),
        resume_from_checkpoint=str(last),
        num_train_epochs=2,
    )
    assert len(tracks[1].after) == STEPS  # the second epoch: task 1's
    for name, keep in spg.keep_factors.items():
        unprotected = tracks[0].after[0][name] - start[name]
        torch.testing.assert_close(
            tracks[1].after[0][name] - start[name], unprotected * keep, rtol=1e-9, atol=1e-15
        )
    assert resumed_spg.tasks_finished == 2
    oracle = _oracle(resumed, spg, 1, TASKS[1])
    for name, a in oracle.importance.items():
        assert torch.equal(resumed_spg.importance[name], a), name


def _stopped(_batch):
    raise RuntimeError("the process stopped here")


def test_a_checkpoint_written_before_its_task_ended_is_not_trained_on(tmp_path):
    """A run that stops between its last checkpoint and end_task leaves a checkpoint whose task is
    not in SPG's state: training on from it is refused; resumed with nothing left to train, the
    task ends and the checkpoint gets it."""
    model = _model(seed=0)
    callback = SPGCallback(_spg(model), prepare_batch=_stopped)
    with pytest.raises(RuntimeError, match="the process stopped here"):
        _train(model, TASKS[0], tmp_path, [callback], save_strategy="steps", save_steps=2)
    last = tmp_path / f"checkpoint-{STEPS}"
    saved = torch.load(last / STATE_FILE, weights_only=True)
    assert saved["spg"]["tasks_finished"] == 0 and saved["over"] is True
    assert saved["ended"] is False

    following = _model(seed=1)
    with pytest.raises(
        RuntimeError,
        match="written after task 0's training had finished but before SPG measured task 0",
    ):
        _train(
            following,
            TASKS[1],
            tmp_path,
            [SPGCallback(_spg(following))],
            resume=True,
            num_train_epochs=2,
        )
    for (name, p), q in zip(model.named_parameters(), following.parameters(), strict=True):
        assert torch.equal(p, q), name  # refused before any step

    again = _model(seed=1)
    again_spg = _spg(again)
    _train(again, TASKS[0], tmp_path, [SPGCallback(again_spg)], resume=True)
    assert again_spg.tasks_finished == 1
    oracle = _oracle(model, _spg(copy.deepcopy(model)), 0, TASKS[0])
    for name, a in oracle.importance.items():
        assert torch.equal(again_spg.importance[name], a), name
    saved = torch.load(last / STATE_FILE, weights_only=True)
    assert saved["spg"]["tasks_finished"] == 1 and saved["ended"] is True


def test_with_load_best_model_at_end_the_best_and_last_checkpoints_hold_the_task(tmp_path):
    """The Trainer loads the best model before training ends: the task is measured on it, and both
    the best checkpoint and the last one are written again with the task."""
    model = _model(seed=0)
    spg = _spg(model)
    _train(
        model,
        TASKS[0],
        tmp_path,
        [SPGCallback(spg)],
        num_train_epochs=2,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        load_best_model_at_end=True,
        eval_dataset=TASKS[1],  # a loss that rises as task 0 is learned: the best is early
    )
    states = {
        int(folder.name.split("-")[1]): torch.load(folder / STATE_FILE, weights_only=True)
        for folder in tmp_path.glob("checkpoint-*")
    }
    last = max(states)
    ended = {step for step, state in states.items() if state["ended"]}
    assert last in ended and len(ended) == 2, sorted(ended)  # the last and the best
    for step in ended:
        assert states[step]["spg"]["tasks_finished"] == 1
        for name, k in spg.keep_factors.items():
            assert torch.equal(states[step]["spg"]["keep"][name], k), (step, name)


class _Parameters(TrainerCallback):
    """The model's parameters after every optimizer step."""

    def __init__(self, model) -> None:
        self.model = model
        self.after: list[dict[str, torch.Tensor]] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.after.append({n: p.detach().clone() for n, p in self.model.named_parameters()})


def test_the_trainers_default_adamw_is_protected_by_the_update_mask(after_task0, tmp_path):
    """mask="auto" masks AdamW's update: the first step moves each element exactly its keep factor
    as far as the unprotected step; over the task, elements with A > 0.9 move far less than those
    with A < 0.1 (gradient masking would leave both at about 1x: Adam normalises it away)."""
    model, spg = after_task0
    masked, masked_spg = _twin(model, spg)
    control = copy.deepcopy(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    tracks = [_Parameters(masked), _Parameters(control)]
    _train(masked, TASKS[1], tmp_path / "m", [SPGCallback(masked_spg), tracks[0]], optimizer=None)
    _train(control, TASKS[1], tmp_path / "c", [tracks[1]], optimizer=None)
    assert len(tracks[0].after) == len(tracks[1].after) == STEPS

    for name, keep in spg.keep_factors.items():
        unmasked = tracks[1].after[0][name] - start[name]
        torch.testing.assert_close(
            tracks[0].after[0][name] - start[name], unmasked * keep, rtol=1e-9, atol=1e-15
        )
    ratios = _moved_ratios(spg, start, tracks[0].after[-1], tracks[1].after[-1])
    assert ratios["high"] < 0.15 and ratios["low"] > 0.8, ratios


def _moved_ratios(spg, start, masked, control) -> dict[str, float]:
    """Mean distance moved with the mask over mean distance moved without it, for the shared
    elements with A > 0.9 ("high") and with A < 0.1 ("low")."""
    sums = {"high": [0.0, 0.0], "low": [0.0, 0.0]}
    for name, a in spg.importance.items():
        for key, where in (("high", a > 0.9), ("low", a < 0.1)):
            for i, end in enumerate((masked, control)):
                sums[key][i] += float((end[name] - start[name])[where].abs().sum())
    return {key: m / c for key, (m, c) in sums.items()}


class NextTokenTrainer(Trainer):
    """Computes the loss itself from unlabelled batches: the model returns no loss of its own."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return _next_token_loss(model, inputs)


def _next_token_loss(model, batch) -> torch.Tensor:
    ids = batch["input_ids"]
    return F.cross_entropy(model(input_ids=ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def test_a_model_without_its_own_loss_needs_the_end_task_options(tmp_path):
    unlabelled = [{"input_ids": example["input_ids"]} for example in TASKS[0]]
    model = _model(seed=0)
    with pytest.raises(ValueError, match="the model returned no loss for a training batch"):
        _train(
            model, unlabelled, tmp_path, [SPGCallback(_spg(model))], trainer_class=NextTokenTrainer
        )

    model = _model(seed=0)
    spg = _spg(model)
    options = {
        "forward": lambda batch: _next_token_loss(model, batch),
        "loss_fn": lambda loss, _: loss,
        "prepare_batch": lambda batch: (batch, None),
    }
    _train(
        model, unlabelled, tmp_path, [SPGCallback(spg, **options)], trainer_class=NextTokenTrainer
    )
    oracle_model = copy.deepcopy(model)
    oracle = _spg(oracle_model)
    batches = [default_data_collator(unlabelled[i : i + BATCH]) for i in range(0, EXAMPLES, BATCH)]
    oracle.end_task(
        0, batches, **{**options, "forward": lambda batch: _next_token_loss(oracle_model, batch)}
    )
    for name, a in oracle.importance.items():
        assert torch.equal(spg.importance[name], a), name
