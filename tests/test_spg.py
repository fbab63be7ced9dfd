"""The end-of-task importance pass, accumulation, head scale, state dicts and their errors."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spg_fast import SPG, storage
from tests.helpers import MultiHeadNet, make_tasks, oracle_importance

# A = 1 - keep, decoded from the float32 keep factor: the keep rounded once (half an ulp, at most
# 2**-25 for a keep in [0.5, 1]) and 1 - keep rounded once when the keep is below 0.5.
TOL = dict(rtol=0, atol=2.0**-24 + 1e-9)
# The stored float32 keep factor is the correctly rounded exact 1 - |tanh(z)|: within half an ulp,
# relative.
KEEP_RTOL = 2.0**-24 + 1e-12


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
    return {n: k.clone() for n, k in spg.keep_factors.items()} | {"tasks": spg.tasks_finished}


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
            keep = spg.keep_factors[n]
            assert keep.dtype == torch.float32
            torch.testing.assert_close(keep.double(), 1 - expected[n], rtol=KEEP_RTOL, atol=0)
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
    keep = dict(sd["keep"])
    if how == "missing":
        del keep["trunk.0.bias"]
    elif how == "extra":
        keep["trunk.9.weight"] = torch.zeros(2)
    elif how == "shape":
        keep["trunk.0.weight"] = keep["trunk.0.weight"].t()
    elif how == "range":
        keep["trunk.3.bias"] = keep["trunk.3.bias"] + 2
    elif how == "nan":
        keep["trunk.3.bias"] = keep["trunk.3.bias"] * float("nan")
    elif how == "dtype":
        keep["trunk.3.bias"] = keep["trunk.3.bias"].long()
    elif how == "keys":
        return {**sd, "extra": 1}
    elif how == "tasks":
        return {**sd, "tasks_finished": -1}
    elif how == "format":
        return {**sd, "format": 99}
    return {**sd, "keep": keep}


@pytest.mark.parametrize(
    "how, message",
    [
        ("missing", "missing keep for trunk.0.bias"),
        ("extra", "unexpected entries trunk.9.weight"),
        ("shape", r"trunk.0.weight: shape \(6, 12\) does not match the parameter's \(12, 6\)"),
        ("range", r"trunk.3.bias: keep factor values must lie in \[0, 1\]"),
        ("nan", r"trunk.3.bias: keep factor values must lie in \[0, 1\]"),
        ("dtype", "trunk.3.bias: keep factors stored as torch.int64"),
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


def test_a_format_1_state_dict_holding_a_loads_as_its_keep_factors(trained):
    model, spg, _ = trained
    old = {"format": 1, "tasks_finished": 1, "importance": spg.importance}
    restored = SPG(model, heads=model.heads)
    restored.load_state_dict(old)
    for name, keep in spg.keep_factors.items():
        expected = (1 - spg.importance[name].double()).float()
        assert torch.equal(restored.keep_factors[name], expected), name
        torch.testing.assert_close(restored.keep_factors[name], keep, rtol=0, atol=2.0**-24)


@pytest.mark.parametrize("saved_as", [torch.float32, torch.bfloat16, torch.uint8])
@pytest.mark.parametrize("load_as", [torch.float32, torch.bfloat16, torch.uint8])
def test_state_dicts_convert_between_storage_formats(trained, saved_as, load_as):
    """A checkpoint in one storage format loads into an SPG of another: decoded, then encoded."""
    model, spg, _ = trained
    source = SPG(model, heads=model.heads, importance_dtype=saved_as)
    source.load_state_dict(spg.state_dict())
    target = SPG(model, heads=model.heads, importance_dtype=load_as)
    target.load_state_dict(source.state_dict())
    for name, stored in source.keep_factors.items():
        assert target.keep_factors[name].dtype == load_as
        expected = storage.encode(storage.decode(stored), load_as)
        assert torch.equal(target.keep_factors[name], expected), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.uint8])
def test_narrow_storage_is_the_float32_keep_encoded(dtype):
    """Encoding is monotone, so accumulating in the narrow format equals encoding the float32
    result exactly, task after task; the keep factor stays within the format's relative bound."""
    torch.manual_seed(4)
    model = MultiHeadNet()
    tasks = make_tasks()
    full = SPG(model, heads=model.heads)
    narrow = SPG(model, heads=model.heads, importance_dtype=dtype)
    for task in range(3):
        full.end_task(task, tasks[task])
        narrow.end_task(task, tasks[task])
        for name, keep in full.keep_factors.items():
            stored = narrow.keep_factors[name]
            assert stored.dtype == dtype
            assert torch.equal(stored, storage.encode(keep, dtype)), name
            decoded = storage.decode(stored).double()
            bound = storage.RELATIVE_ERROR[dtype]
            assert ((decoded - keep.double()).abs() <= bound * keep.double()).all(), name
            assert bool((decoded[keep > 0] > 0).all()), name
    with pytest.raises(ValueError, match="importance_dtype must be"):
        SPG(model, heads=model.heads, importance_dtype=torch.float16)
