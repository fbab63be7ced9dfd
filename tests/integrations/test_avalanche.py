"""The Avalanche plugin with the real avalanche-lib: a task-incremental benchmark built from tensors
(2 experiences with task labels 5 and 2), a network whose classifier is a ``MultiHeadClassifier``,
a ``Naive`` strategy with AdamW. Avalanche needs torchvision, which the project's CPU environment
cannot import: ``make test-avalanche`` runs this file in an environment of its own."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from spg_fast import SPG

pytest.importorskip("avalanche")
from avalanche.benchmarks import tensors_benchmark
from avalanche.checkpointing import maybe_load_checkpoint, save_checkpoint
from avalanche.core import SupervisedPlugin
from avalanche.models import MultiHeadClassifier, MultiTaskModule
from avalanche.training.plugins import EvaluationPlugin
from avalanche.training.supervised import Naive

from spg_fast.integrations.avalanche import SPGPlugin

FEATURES, HIDDEN, CLASSES, EXAMPLES, BATCH = 8, 32, 3, 64, 16
LABELS = [5, 2]  # the experiences' task labels: SPG's task k uses the head of LABELS[k]


class Net(MultiTaskModule):
    """A shared trunk and a head per task label (``MultiHeadClassifier``)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.Tanh())
        self.classifier = MultiHeadClassifier(HIDDEN, CLASSES)

    def forward_single_task(self, x: torch.Tensor, task_label: int) -> torch.Tensor:
        return self.classifier(self.trunk(x), task_label)


def _tensors(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(FEATURES, CLASSES, generator=g)
    x = torch.randn(EXAMPLES, FEATURES, generator=g)
    return [x, (x @ teacher).argmax(1)]


TRAIN = [_tensors(k) for k in range(len(LABELS))]
BENCHMARK = tensors_benchmark(
    train_tensors=TRAIN, test_tensors=[_tensors(10 + k) for k in range(2)], task_labels=LABELS
)


class _Parameters(SupervisedPlugin):
    """The model's parameters after every optimizer step."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[dict[str, torch.Tensor]] = []

    def after_update(self, strategy, *args, **kwargs):
        self.steps.append({n: p.detach().clone() for n, p in strategy.model.named_parameters()})


def _strategy(model: Net, plugins: list) -> Naive:
    return Naive(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
        train_mb_size=BATCH,
        train_epochs=2,
        plugins=plugins,
        evaluator=EvaluationPlugin(loggers=[]),
    )


def _spg(model: Net) -> SPG:
    return SPG(model, heads="classifier")


def _oracle(model: Net, state: dict | None, task: int) -> SPG:
    """An SPG of a copy of ``model`` with ``state`` that ended ``task`` over the experience's
    tensors, calling the head of each earlier experience's task label."""
    twin = copy.deepcopy(model)
    spg = _spg(twin)
    if state is not None:
        spg.load_state_dict(state)
    x, y = TRAIN[task]
    batches = [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, EXAMPLES, BATCH)]
    spg.end_task(task, batches, lambda x, head: twin(x, LABELS[head]))
    return spg


@pytest.fixture(scope="module")
def run():
    """Both experiences trained with the plugin; the model and SPG state after each."""
    torch.manual_seed(0)
    model = Net()
    spg = _spg(model)
    plugin = SPGPlugin(spg)
    strategy = _strategy(model, [plugin])
    after = []
    for experience in BENCHMARK.train_stream:
        strategy.train(experience)
        after.append((copy.deepcopy(model), copy.deepcopy(spg.state_dict())))
    return model, spg, plugin, after


def test_each_experience_ends_a_task_on_its_own_data_with_its_own_head(run):
    _, spg, plugin, after = run
    assert spg.tasks_finished == 2 and plugin.task_labels == LABELS
    for task, (model, state) in enumerate(after):
        oracle = _oracle(model, after[task - 1][1] if task else None, task)
        for name, keep in oracle.keep_factors.items():
            assert torch.equal(state["keep"][name], keep), (task, name)
    assert set(spg.keep_factors) == {"trunk.0.weight", "trunk.0.bias"}


def test_adamw_is_masked_on_its_update(run):
    """The second experience from the first's end, with and without the plugin: the first step
    moves each element its keep factor (heads: the head scale) as far as the unprotected step;
    over the experience, elements with A > 0.9 move far less than those with A < 0.1."""
    _, _, plugin, after = run
    model, state = after[0]
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    tracks = [_Parameters(), _Parameters()]
    masked = copy.deepcopy(model)
    masked_plugin = SPGPlugin(_spg(masked))
    masked_plugin.load_state_dict({**plugin.state_dict(), "spg": state, "task_labels": LABELS[:1]})
    torch.manual_seed(1)  # the same shuffled batches for both
    _strategy(masked, [masked_plugin, tracks[0]]).train(BENCHMARK.train_stream[1])
    torch.manual_seed(1)
    _strategy(copy.deepcopy(model), [tracks[1]]).train(BENCHMARK.train_stream[1])

    keep = masked_plugin.spg  # the state after task 0 until the end of the experience
    assert keep.tasks_finished == 2
    reference = _spg(copy.deepcopy(model))
    reference.load_state_dict(state)
    for name, p in start.items():
        factor = reference.keep_factors.get(name, reference.head_scale)
        unprotected = tracks[1].steps[0][name] - p
        torch.testing.assert_close(
            tracks[0].steps[0][name] - p, unprotected * factor, rtol=1e-5, atol=1e-7
        )
    moved = {"high": [0.0, 0.0], "low": [0.0, 0.0]}
    for name, a in reference.importance.items():
        for key, where in (("high", a > 0.9), ("low", a < 0.1)):
            for i, track in enumerate(tracks):
                moved[key][i] += float((track.steps[-1][name] - start[name])[where].abs().sum())
    ratios = {key: m / c for key, (m, c) in moved.items()}
    assert ratios["high"] < 0.15 and ratios["low"] > 0.8, ratios


def test_avalanche_checkpoints_carry_spg(run, tmp_path: Path):
    """save_checkpoint after the first experience, maybe_load_checkpoint into fresh objects: the
    loaded strategy's plugin holds SPG's state, and the second experience ends task 1 on its data.

    Avalanche's checkpoint (dill) cannot pickle a torch optimizer here (dill 0.4.1 with torch 2.14:
    "Can't pickle sentinel"), so the optimizer is left out and the loaded strategy gets a new one,
    as Avalanche's ``exclude`` expects."""
    torch.manual_seed(0)
    model = Net()
    strategy = _strategy(model, [SPGPlugin(_spg(model))])
    strategy.train(BENCHMARK.train_stream[0])
    path = tmp_path / "checkpoint.pkl"
    save_checkpoint(strategy, str(path), exclude=["optimizer"])

    fresh = Net()
    loaded, start = maybe_load_checkpoint(_strategy(fresh, [SPGPlugin(_spg(fresh))]), str(path))
    assert start == 1
    plugin = next(p for p in loaded.plugins if isinstance(p, SPGPlugin))
    assert plugin.spg.tasks_finished == 1 and plugin.task_labels == LABELS[:1]
    assert plugin.spg.model is loaded.model
    _, state = run[3][0]
    for name, keep in plugin.spg.keep_factors.items():
        assert torch.equal(keep, state["keep"][name]), name

    loaded.optimizer = torch.optim.AdamW(loaded.model.parameters(), lr=1e-2)
    loaded.optimized_param_id = None  # Avalanche maps the new optimizer's parameters afresh
    before = copy.deepcopy(plugin.spg.state_dict())
    loaded.train(BENCHMARK.train_stream[1])
    assert plugin.spg.tasks_finished == 2 and plugin.task_labels == LABELS
    oracle = _oracle(loaded.model, before, 1)
    for name, keep in oracle.keep_factors.items():
        assert torch.equal(plugin.spg.keep_factors[name], keep), name


def test_the_plugin_state_round_trips_through_a_weights_only_load(run, tmp_path: Path):
    _, spg, plugin, _ = run
    torch.save(plugin.state_dict(), tmp_path / "spg.pt")
    model = Net()
    twin = SPGPlugin(_spg(model))
    twin.load_state_dict(torch.load(tmp_path / "spg.pt", weights_only=True))
    assert twin.task_labels == LABELS and twin.spg.tasks_finished == 2
    for name, keep in spg.keep_factors.items():
        assert torch.equal(twin.spg.keep_factors[name], keep), name


def test_a_task_label_learned_already_is_refused_with_heads(run):
    _, _, plugin, after = run
    model, state = after[0]
    again = copy.deepcopy(model)
    again_plugin = SPGPlugin(_spg(again))
    again_plugin.load_state_dict({**plugin.state_dict(), "spg": state, "task_labels": LABELS[:1]})
    with pytest.raises(ValueError, match="task label 5 is that of SPG task 0 already"):
        _strategy(again, [again_plugin]).train(BENCHMARK.train_stream[0])
