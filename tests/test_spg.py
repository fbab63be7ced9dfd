"""The end-of-task importance pass, accumulation, head scale, state dicts and their errors."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spg_fast import SPG
from tests.helpers import MultiHeadNet, make_tasks, oracle_importance

TOL = dict(rtol=0, atol=2.0**-25 + 1e-9)


def _oracle_task_importance(model: MultiHeadNet, task: int, batches) -> dict[str, torch.Tensor]:
    """gamma_task in float64 from gradients summed by an independent loop over heads 0..task."""
    shared = dict(model.trunk.named_parameters(prefix="trunk"))
    gamma = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in shared.items()}
    for head in range(task + 1):
        model.zero_grad(set_to_none=True)
        for x, y in batches:
            logits = model(x, head)
            (F.cross_entropy(logits, y) if head == task else logits.sum()).backward()
        for n, p in shared.items():
            gamma[n] = torch.maximum(gamma[n], oracle_importance(p.grad))
    model.zero_grad(set_to_none=True)
    return gamma


def _state(spg: SPG) -> dict:
    return {n: a.clone() for n, a in spg.importance.items()} | {"tasks": spg.tasks_finished}


def _assert_same_state(spg: SPG, saved: dict) -> None:
    now = _state(spg)
    assert now.keys() == saved.keys()
    assert all(torch.equal(now[k], saved[k]) if k != "tasks" else now[k] == saved[k] for k in saved)


def test_end_task_follows_the_spec_over_three_tasks():
    torch.manual_seed(0)
    model = MultiHeadNet()
    tasks = make_tasks()
    spg = SPG(model, heads=model.heads)
    assert spg.importance == {} and spg.head_scale is None
    expected = None
    for task, batches in enumerate(tasks):
        gamma = _oracle_task_importance(model, task, batches)
        expected = (
            gamma if expected is None else {n: torch.maximum(expected[n], gamma[n]) for n in gamma}
        )
        spg.end_task(task, batches)
        assert spg.tasks_finished == task + 1
        assert list(spg.importance) == list(expected)
        for n, a in spg.importance.items():
            assert a.dtype == torch.float32
            torch.testing.assert_close(a.double(), expected[n], **TOL)
        mean = torch.cat([a.flatten() for a in expected.values()]).mean()
        torch.testing.assert_close(spg.head_scale.double(), 1 - mean, rtol=0, atol=2.0**-24)
        assert all(p.grad is None for p in model.parameters())


def test_end_task_restores_mode_and_can_disable_dropout():
    torch.manual_seed(1)
    with_dropout = MultiHeadNet(dropout=0.5)
    plain = MultiHeadNet()
    plain.load_state_dict(with_dropout.state_dict())
    batches = make_tasks(n_tasks=1)[0]
    a, b = SPG(with_dropout, heads="heads"), SPG(plain, heads="heads")
    with_dropout.eval()
    a.end_task(0, batches, train_mode=False)
    b.end_task(0, batches)
    assert not with_dropout.training and plain.training
    for n in a.importance:
        assert torch.equal(a.importance[n], b.importance[n])


def test_end_task_runs_dropout_in_train_mode_by_default():
    torch.manual_seed(1)
    model = MultiHeadNet(dropout=0.5)
    batches = make_tasks(n_tasks=1)[0]
    eval_spg, train_spg = SPG(model, heads="heads"), SPG(model, heads="heads")
    eval_spg.end_task(0, batches, train_mode=False)
    train_spg.end_task(0, batches)
    assert not torch.equal(
        eval_spg.importance["trunk.0.weight"], train_spg.importance["trunk.0.weight"]
    )


def test_custom_forward_loss_and_batch_preparation():
    torch.manual_seed(2)
    model = MultiHeadNet()
    batches = make_tasks(n_tasks=1)[0]
    dict_loader = [{"input": x, "label": y} for x, y in batches]
    seen = []

    def forward(x, head):
        seen.append(head)
        return model(x, head)

    custom = SPG(model, heads=model.heads)
    custom.end_task(
        0,
        dict_loader,
        forward,
        loss_fn=lambda logits, y: F.cross_entropy(logits, y) * 3,
        prepare_batch=lambda b: (b["input"], b["label"]),
    )
    assert seen == [0] * len(batches)
    plain = SPG(model, heads=model.heads)
    plain.end_task(0, batches)
    # Standardisation removes the scale of the loss: tripling it changes nothing beyond rounding.
    for n in plain.importance:
        torch.testing.assert_close(custom.importance[n], plain.importance[n], rtol=0, atol=1e-6)


def test_loader_of_wrong_shape_is_explained():
    model = MultiHeadNet()
    with pytest.raises(TypeError, match="not an \\(x, y\\) pair; pass prepare_batch"):
        SPG(model, heads="heads").end_task(0, [torch.zeros(2, 6)])


@pytest.fixture
def trained():
    """A model and its SPG after task 0, with task 1's data."""
    torch.manual_seed(3)
    model = MultiHeadNet()
    tasks = make_tasks()
    spg = SPG(model, heads=model.heads)
    spg.end_task(0, tasks[0])
    return model, spg, tasks


def test_non_finite_gradient_names_the_parameter_and_changes_nothing(trained):
    model, spg, tasks = trained
    saved = _state(spg)
    handle = model.trunk[3].bias.register_hook(lambda g: g * float("nan"))
    with pytest.raises(
        FloatingPointError, match=r"head 0 in parameter\(s\) trunk\.3\.bias: first at batch 0 "
    ):
        spg.end_task(1, tasks[1])
    handle.remove()
    _assert_same_state(spg, saved)
    assert all(p.grad is None for p in model.parameters())
    spg.end_task(1, tasks[1])
    assert spg.tasks_finished == 2


def test_empty_loader_is_an_error_and_changes_nothing(trained):
    _, spg, _ = trained
    saved = _state(spg)
    with pytest.raises(ValueError, match="yielded no batches"):
        spg.end_task(1, iter([]))
    _assert_same_state(spg, saved)


@pytest.mark.parametrize("task_id", [0, 2, -1])
def test_tasks_end_in_order(trained, task_id):
    _, spg, tasks = trained
    with pytest.raises(ValueError, match="the task to end is 1"):
        spg.end_task(task_id, tasks[1])


def test_heads_added_later_are_picked_up():
    model = MultiHeadNet(n_tasks=1)
    spg = SPG(model, heads=model.heads)
    model.heads.append(nn.Linear(12, 3))
    spg.end_task(0, make_tasks(n_tasks=1)[0])
    assert "heads.1.weight" in spg.head_parameters and "heads.1.weight" not in spg.importance


def test_shared_parameters_may_not_change():
    model = MultiHeadNet()
    spg = SPG(model, heads=model.heads)
    model.extra = nn.Linear(2, 2)
    with pytest.raises(
        ValueError, match=r"shared parameters changed .*added: \['extra.bias', 'extra.weight'\]"
    ):
        spg.end_task(0, make_tasks(n_tasks=1)[0])


def test_state_dict_round_trips_through_torch_load_weights_only(trained):
    model, spg, _ = trained
    buffer = io.BytesIO()
    torch.save(spg.state_dict(), buffer)
    buffer.seek(0)
    restored = SPG(model, heads=model.heads)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.tasks_finished == 1
    _assert_same_state(restored, _state(spg))
    assert torch.equal(restored.head_scale, spg.head_scale)


def test_state_dict_before_any_task_round_trips():
    model = MultiHeadNet()
    spg = SPG(model, heads="heads")
    other = SPG(model, heads="heads")
    other.load_state_dict(spg.state_dict())
    assert other.tasks_finished == 0 and other.head_scale is None


def _corrupt(sd: dict, how: str) -> dict:
    imp = dict(sd["importance"])
    if how == "missing":
        del imp["trunk.0.bias"]
    elif how == "extra":
        imp["trunk.9.weight"] = torch.zeros(2)
    elif how == "shape":
        imp["trunk.0.weight"] = imp["trunk.0.weight"].t()
    elif how == "range":
        imp["trunk.3.bias"] = imp["trunk.3.bias"] + 2
    elif how == "nan":
        imp["trunk.3.bias"] = imp["trunk.3.bias"] * float("nan")
    elif how == "dtype":
        imp["trunk.3.bias"] = imp["trunk.3.bias"].long()
    elif how == "keys":
        return {**sd, "extra": 1}
    elif how == "tasks":
        return {**sd, "tasks_finished": -1}
    elif how == "format":
        return {**sd, "format": 99}
    return {**sd, "importance": imp}


@pytest.mark.parametrize(
    "how, message",
    [
        ("missing", "missing importance for trunk.0.bias"),
        ("extra", "unexpected entries trunk.9.weight"),
        ("shape", r"trunk.0.weight: shape \(6, 12\) does not match the parameter's \(12, 6\)"),
        ("range", r"trunk.3.bias: importance values must lie in \[0, 1\]"),
        ("nan", r"trunk.3.bias: importance values must lie in \[0, 1\]"),
        ("dtype", "trunk.3.bias: expected a floating-point tensor"),
        ("keys", "must have keys"),
        ("tasks", "tasks_finished must be an int >= 0"),
        ("format", "format 99"),
    ],
)
def test_bad_state_dicts_are_rejected_and_change_nothing(trained, how, message):
    model, spg, _ = trained
    target = SPG(model, heads=model.heads)
    target.end_task(0, make_tasks(seed=5)[0])
    saved = _state(target)
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(_corrupt(spg.state_dict(), how))
    _assert_same_state(target, saved)


def test_bfloat16_importance_is_the_float32_importance_rounded():
    """Rounding is monotone, so max-accumulating in bfloat16 equals rounding the float32 result:
    within 2**-9."""
    torch.manual_seed(4)
    model = MultiHeadNet()
    tasks = make_tasks()
    full = SPG(model, heads=model.heads)
    half = SPG(model, heads=model.heads, importance_dtype=torch.bfloat16)
    for task in range(2):
        full.end_task(task, tasks[task])
        half.end_task(task, tasks[task])
    for name, a in full.importance.items():
        assert half.importance[name].dtype == torch.bfloat16
        assert torch.equal(half.importance[name], a.to(torch.bfloat16)), name
        assert (half.importance[name].float() - a).abs().max() <= 2.0**-9
    with pytest.raises(ValueError, match="importance_dtype must be"):
        SPG(model, heads=model.heads, importance_dtype=torch.float16)
