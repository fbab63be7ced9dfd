"""SPG.end_task where people train: models without per-task heads, no side effects on the model
(buffers, modes, .grad), and errors that name the batch and head."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spg_fast import SPG
from tests.helpers import MultiHeadNet, make_tasks, oracle_importance

# A decoded from the float32 keep factor: two roundings (see tests/test_spg.py).
TOL = dict(rtol=0, atol=2.0**-24 + 1e-9)


def _single_output_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3)
    )


def _own_loss_importance(model: nn.Module, batches, loss) -> dict[str, torch.Tensor]:
    """The spec without heads, literally: the gradient of the task's own loss summed
    over batches."""
    model.zero_grad(set_to_none=True)
    for batch in batches:
        loss(model, batch).backward()
    got = {n: oracle_importance(p.grad) for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return got


def test_without_heads_every_parameter_is_shared_and_only_the_own_loss_counts():
    torch.manual_seed(0)
    model = _single_output_net()
    spg = SPG(model)
    assert spg.head_parameters == {} and list(spg.shared_parameters) == [
        n for n, _ in model.named_parameters()
    ]
    expected = None
    for task, batches in enumerate(
        make_tasks(n_tasks=2)
    ):  # domain-incremental: one output, new data per task
        gamma = _own_loss_importance(model, batches, lambda m, b: F.cross_entropy(m(b[0]), b[1]))
        expected = (
            gamma if expected is None else {n: torch.maximum(expected[n], gamma[n]) for n in gamma}
        )
        report = spg.end_task(task, batches)
        assert report.passes == 1 and not report.shared_forward and report.reason == "one head"
        for n, a in spg.importance.items():
            torch.testing.assert_close(a.double(), expected[n], **TOL)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    spg.mask_gradients()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, spg.keep_factors[n], rtol=0, atol=0)


def test_without_heads_forward_takes_only_the_input():
    torch.manual_seed(1)
    model = _single_output_net()
    seen = []

    def forward(x):
        seen.append(x.shape)
        return model(x)

    batches = make_tasks(n_tasks=1)[0]
    SPG(model, heads=None).end_task(0, batches, forward)
    assert seen == [x.shape for x, _ in batches]


@dataclass
class Output:
    loss: torch.Tensor
    logits: torch.Tensor


class LanguageModelLike(nn.Module):
    """Returns an object with ``.loss`` from keyword inputs, as Hugging Face causal language
    models do."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.body = nn.Sequential(nn.Linear(8, 8), nn.GELU())
        self.lm_head = nn.Linear(8, 11)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> Output:
        logits = self.lm_head(self.body(self.embed(input_ids)))
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
        return Output(loss, logits)


def test_models_returning_their_loss_use_prepare_batch_and_loss_fn():
    torch.manual_seed(2)
    model = LanguageModelLike()
    g = torch.Generator().manual_seed(3)
    loader = [
        {"input_ids": ids, "labels": ids} for ids in torch.randint(0, 11, (3, 4, 6), generator=g)
    ]
    spg = SPG(model)
    spg.end_task(
        0,
        loader,
        lambda batch: model(**batch),
        loss_fn=lambda out, _: out.loss,
        prepare_batch=lambda batch: (batch, None),
    )
    expected = _own_loss_importance(model, loader, lambda m, b: m(**b).loss)
    for n, a in spg.importance.items():
        torch.testing.assert_close(a.double(), expected[n], **TOL)


class BatchNormNet(MultiHeadNet):
    def __init__(self) -> None:
        super().__init__(n_tasks=2)
        self.trunk = nn.Sequential(
            nn.Linear(6, 12),
            nn.BatchNorm1d(12),
            nn.ReLU(),
            nn.Dropout(0.3),
            nn.Linear(12, 12),
            nn.Tanh(),
        )


def _snapshot(model: nn.Module) -> dict:
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "buffer_objects": {n: b for n, b in model.named_buffers()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "grads": {n: p.grad for n, p in model.named_parameters()},
        "grad_values": {
            n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
        },
    }


def _assert_unchanged(model: nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert all(torch.equal(after["params"][n], v) for n, v in before["params"].items())
    assert after["buffers"].keys() == before["buffers"].keys()
    assert all(torch.equal(after["buffers"][n], v) for n, v in before["buffers"].items())
    assert all(after["buffer_objects"][n] is v for n, v in before["buffer_objects"].items())
    assert after["modes"] == before["modes"]
    assert all(after["grads"][n] is g for n, g in before["grads"].items())
    assert all(
        g is None or torch.equal(after["grad_values"][n], g)
        for n, g in before["grad_values"].items()
    )


@pytest.fixture
def batchnorm_model():
    torch.manual_seed(4)
    model = BatchNormNet()
    tasks = make_tasks(n_tasks=2)
    for x, _ in tasks[0]:  # give the running statistics some history
        model.trunk(x)
    model.eval()
    model.trunk[3].train()  # mixed modes must come back as they were
    model.trunk[0].weight.grad = torch.randn(12, 6)  # a gradient left from training
    accumulated = []
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: accumulated.append(p))
    return model, tasks, accumulated


def test_end_task_leaves_the_model_as_it_found_it(batchnorm_model):
    model, tasks, accumulated = batchnorm_model
    spg = SPG(model, heads=model.heads)
    before = _snapshot(model)
    spg.end_task(0, tasks[0])
    spg.end_task(1, tasks[1])
    _assert_unchanged(model, before)
    assert accumulated == []  # the pass never accumulated into .grad


def test_failed_end_task_leaves_model_and_importance_as_they_were(batchnorm_model):
    model, tasks, _ = batchnorm_model
    spg = SPG(model, heads=model.heads)
    spg.end_task(0, tasks[0])
    saved = {n: a.clone() for n, a in spg.importance.items()}
    before = _snapshot(model)
    bad = [(x.clone(), y) for x, y in tasks[1]]
    bad[1][0][0, 0] = float("nan")
    with pytest.raises(
        FloatingPointError,
        match=r"SPG\.end_task\(1\): the loss is non-finite \(NaN or Inf\) at "
        r"batch 1 \(counting from 0\) for head 0; check that batch's data",
    ):
        spg.end_task(1, bad)
    _assert_unchanged(model, before)
    assert torch.isfinite(model.trunk[1].running_mean).all()
    assert spg.tasks_finished == 1 and all(
        torch.equal(spg.importance[n], a) for n, a in saved.items()
    )
    model.eval()
    assert torch.isfinite(model(tasks[1][0][0], 0)).all()


def test_non_finite_loss_without_heads_names_the_batch():
    model = _single_output_net()
    batches = [(x.clone(), y) for x, y in make_tasks(n_tasks=1)[0]]
    batches[2][0][3, 1] = float("inf")
    with pytest.raises(FloatingPointError, match=r"at batch 2 \(counting from 0\) for the task;"):
        SPG(model).end_task(0, batches)


def test_eval_mode_pass_shares_the_forward_of_a_dropout_model():
    torch.manual_seed(5)
    model = MultiHeadNet(dropout=0.5)
    tasks = make_tasks()
    spg = SPG(model, heads="heads")
    spg.end_task(0, tasks[0])
    train_report = spg.end_task(1, tasks[1])
    assert not train_report.shared_forward and "random modules" in train_report.reason
    eval_report = SPG(model, heads="heads").end_task(0, tasks[0], train_mode=False)
    assert eval_report.reason == "one head"
    other = SPG(model, heads="heads")
    other.end_task(0, tasks[0], train_mode=False)
    report = other.end_task(1, tasks[1], train_mode=False)
    assert report.shared_forward and report.passes == 1


def test_non_finite_gradient_messages_say_where_it_came_from():
    torch.manual_seed(6)
    model = _single_output_net()
    batches = make_tasks(n_tasks=1, n_batches=3)[0]
    calls = [0]

    def second_call_only(grad):
        calls[0] += 1
        return grad * float("nan") if calls[0] == 2 else grad

    handle = model[2].weight.register_hook(second_call_only)
    with pytest.raises(
        FloatingPointError,
        match=r"in parameter\(s\) 2\.weight: not traced to a batch \(repeating "
        r"the pass did not reproduce it\); every loss was finite",
    ):
        SPG(model).end_task(0, batches)
    handle.remove()
    model[2].weight.register_hook(lambda grad: grad * float("inf"))
    with pytest.raises(
        FloatingPointError, match=r"2\.weight: first at batch 0 \(counting from 0\)"
    ):
        SPG(model).end_task(0, batches)


def test_progress_is_reported_after_every_batch_of_every_head():
    torch.manual_seed(0)
    model = MultiHeadNet()
    spg = SPG(model, heads=model.heads)
    tasks = make_tasks()
    spg.end_task(0, tasks[0])
    seen = []
    spg.end_task(1, tasks[1], shared_forward=False, progress=seen.append)
    batches = len(tasks[1])
    assert [(p.head, p.batch) for p in seen] == [(h, b + 1) for h in (0, 1) for b in range(batches)]
    assert {p.heads for p in seen} == {2} and {p.batches for p in seen} == {batches}
    assert seen[-1].passes == 2 and seen[-1].heads_done in (1, 2)
