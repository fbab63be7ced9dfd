"""The Lightning callback with the real library: two tasks fitted on the CPU, the masked gradients
checked against an unmasked run, the importance pass against SPG.end_task, and SPG's state through
Lightning checkpoints."""

from __future__ import annotations

import copy
import re
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from spg_fast import SPG
from tests.helpers import MultiHeadNet, make_tasks

L = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.strategies import (  # noqa: E402
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
)

from spg_fast.integrations.lightning import SPGCallback  # noqa: E402
from tests.integrations.recording import RecordingSGD  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*LeafSpec.* is deprecated"),
    pytest.mark.filterwarnings(
        "ignore:Be aware that when using `ckpt_path`, callbacks used to create"
    ),
]


class TaskModule(L.LightningModule):
    """A multi-head net trained on head ``self.task`` with SGD; records the gradients every
    optimizer step sees."""

    def __init__(self, net: MultiHeadNet) -> None:
        super().__init__()
        self.net = net
        self.task = 0
        self.optimizers_made: list[RecordingSGD] = []
        self.wrap_with: SPG | None = (
            None  # configure_optimizers returns wrap_with.wrap(SGD) when set
        )
        self.adamw = False  # configure_optimizers returns torch's AdamW when set

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x, self.task), y)

    def configure_optimizers(self):
        if self.adamw:
            return torch.optim.AdamW(self.net.parameters(), lr=0.01)
        optimizer = RecordingSGD(self.net, lr=0.5)
        self.optimizers_made.append(optimizer)
        return self.wrap_with.wrap(optimizer) if self.wrap_with else optimizer

    @property
    def seen(self) -> list[dict[str, torch.Tensor]]:
        """The gradients each optimizer step of the last fit applied, by parameter name."""
        return self.optimizers_made[-1].seen


def _loaders() -> list[DataLoader]:
    loaders = []
    for batches in make_tasks(n_tasks=2, n_batches=3, batch=8):
        x = torch.cat([b[0] for b in batches]).double()
        y = torch.cat([b[1] for b in batches])
        loaders.append(DataLoader(TensorDataset(x, y), batch_size=8))
    return loaders


def _module(seed: int) -> TaskModule:
    torch.manual_seed(seed)
    return TaskModule(MultiHeadNet().double())


def _fit(module, loader, root, callbacks=(), ckpt_path=None, **trainer_args) -> None:
    checkpointing = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    trainer = L.Trainer(
        **{"max_epochs": 2, **trainer_args},
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=checkpointing,
        default_root_dir=root,
        callbacks=list(callbacks),
    )
    trainer.fit(module, loader, ckpt_path=ckpt_path)


def _copy_for_task1(module: TaskModule, spg: SPG) -> tuple[TaskModule, SPG]:
    """A copy of the model after task 0 with its own SPG holding the same state, set to train
    task 1."""
    twin = copy.deepcopy(module)
    twin.task, twin.optimizers_made = 1, []
    twin_spg = SPG(twin.net, heads=twin.net.heads)
    twin_spg.load_state_dict(spg.state_dict())
    return twin, twin_spg


@pytest.fixture(scope="module")
def task0_run(tmp_path_factory):
    """Task 0 fitted with the callback and a checkpoint after each epoch: (module, spg, loaders,
    checkpoint folder)."""
    loaders = _loaders()
    module = _module(seed=0)
    spg = SPG(module.net, heads=module.net.heads)
    folder = tmp_path_factory.mktemp("task0")
    _fit(module, loaders[0], folder, [SPGCallback(spg), _checkpoints(folder)])
    return module, spg, loaders, folder


@pytest.fixture(scope="module")
def after_task0(task0_run):
    """(module, spg, loaders) after task 0."""
    return task0_run[:3]


def test_fit_ends_the_task_over_the_train_dataloader(after_task0):
    module, spg, loaders = after_task0
    assert spg.tasks_finished == 1
    oracle_net = copy.deepcopy(module.net)
    oracle = SPG(oracle_net, heads=oracle_net.heads)
    oracle.end_task(0, loaders[0])
    assert spg.importance.keys() == oracle.importance.keys()
    for name, a in oracle.importance.items():
        assert torch.equal(spg.importance[name], a), name
    assert max(float(a.max()) for a in spg.importance.values()) > 0.9


def test_task_two_is_masked_once_before_each_step(after_task0, tmp_path):
    module, spg, loaders = after_task0
    masked, masked_spg = _copy_for_task1(module, spg)
    control, _ = _copy_for_task1(module, spg)
    _fit(masked, loaders[1], tmp_path / "masked", [SPGCallback(masked_spg, mask="gradient")])
    _fit(control, loaders[1], tmp_path / "control")

    # The first step starts from the same weights: what the optimizer sees is exactly the unmasked
    # gradient times 1 - A (shared) or 1 - mean(A) (heads), masked once.
    assert len(masked.seen) == len(control.seen) == 6
    assert (
        masked.seen[0].keys()
        == control.seen[0].keys()
        == {*spg.importance, "heads.1.weight", "heads.1.bias"}
    )
    for name, g in control.seen[0].items():
        factor = spg.keep_factors[name] if name in spg.importance else spg.head_scale
        assert torch.equal(masked.seen[0][name], g * factor), name

    # Over the whole task, the weights task 0 relies on most (A > 0.9) move far less than without
    # the callback.
    with torch.no_grad():
        start = dict(module.net.named_parameters())
        high = {n: a > 0.9 for n, a in spg.importance.items()}
        moved = [
            sum(
                float((dict(m.net.named_parameters())[n] - start[n])[h].abs().sum())
                for n, h in high.items()
            )
            for m in (masked, control)
        ]
    assert sum(int(h.sum()) for h in high.values()) >= 10
    assert moved[0] < 0.1 * moved[1]


def _checkpoints(folder) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=folder, filename="{epoch}", save_top_k=-1, every_n_epochs=1)


@pytest.fixture(scope="module")
def task1_checkpointed(after_task0, tmp_path_factory):
    """Task 1 fitted with the callback and a checkpoint after each epoch: (module, spg,
    checkpoint folder)."""
    module, spg, loaders = after_task0
    run, run_spg = _copy_for_task1(module, spg)
    folder = tmp_path_factory.mktemp("task1")
    _fit(run, loaders[1], folder, [SPGCallback(run_spg), _checkpoints(folder)])
    return run, run_spg, folder


@pytest.mark.parametrize("resume_from", ["epoch=0.ckpt", "epoch=1.ckpt"])
def test_a_checkpoint_restores_spg_state_and_the_run_continues_identically(
    after_task0, task1_checkpointed, tmp_path, resume_from
):
    _, spg, loaders = after_task0
    run, run_spg, folder = task1_checkpointed
    assert run_spg.tasks_finished == 2
    checkpoint = tmp_path / resume_from
    shutil.copy(folder / resume_from, checkpoint)

    saved = torch.load(checkpoint, weights_only=True)["callbacks"]["SPGCallback"]
    # The last checkpoint of the task was written again once the task had ended: it holds task 1.
    last = resume_from == "epoch=1.ckpt"
    assert saved["spg"]["tasks_finished"] == 1 + last
    assert saved["ended"] is last and saved["over"] is last
    for name, k in (run_spg if last else spg).keep_factors.items():
        assert torch.equal(saved["spg"]["keep"][name], k), name

    # Fresh weights and a fresh SPG: everything comes from the checkpoint. From the mid-task
    # checkpoint the second epoch trains with the restored masks and the task ends; from the last
    # one Lightning skips training and the task, ended already, is not ended again.
    resumed = _module(seed=1)
    resumed.task = 1
    resumed_spg = SPG(resumed.net, heads=resumed.net.heads)
    _fit(resumed, loaders[1], tmp_path, [SPGCallback(resumed_spg)], ckpt_path=checkpoint)
    assert resumed_spg.tasks_finished == 2
    for name, a in run_spg.importance.items():
        assert torch.equal(resumed_spg.importance[name], a), name
    for (name, p), q in zip(run.net.named_parameters(), resumed.net.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_an_optimizer_already_masked_is_refused(after_task0, tmp_path):
    module, spg, loaders = after_task0
    twin, twin_spg = _copy_for_task1(module, spg)
    twin.wrap_with = twin_spg
    with pytest.raises(RuntimeError, match="is already masked through an SPG object"):
        _fit(twin, loaders[1], tmp_path, [SPGCallback(twin_spg)])
    assert twin.optimizers_made[0].seen == []  # refused when the fit starts, before any step


def test_bad_set_ups_are_refused_with_the_reason(after_task0, tmp_path):
    module, spg, loaders = after_task0
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'loss'.*loss_fn"):
        SPGCallback(spg, loss=F.cross_entropy)
    with pytest.raises(TypeError, match=r"needs an spg_fast\.SPG"):
        SPGCallback(module.net)
    other = MultiHeadNet().double()
    with pytest.raises(ValueError, match="does not hold SPG's shared parameter"):
        _fit(
            copy.deepcopy(module),
            loaders[1],
            tmp_path,
            [SPGCallback(SPG(other, heads=other.heads))],
        )


class _Parameters(L.Callback):
    """The network's parameters after every optimizer step."""

    def __init__(self) -> None:
        self.after: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append({n: p.detach().clone() for n, p in pl_module.net.named_parameters()})


def _factor(spg: SPG, name: str) -> torch.Tensor:
    return spg.keep_factors.get(name, spg.head_scale)


def _oracle(module: TaskModule, spg: SPG, task: int, loader: DataLoader) -> SPG:
    """A copy of ``module``'s network with ``spg``'s state that ended ``task`` over ``loader``."""
    net = copy.deepcopy(module.net)
    oracle = SPG(net, heads=net.heads)
    oracle.load_state_dict(spg.state_dict())
    oracle.end_task(task, loader)
    return oracle


def test_the_next_task_resumes_from_the_last_checkpoint_of_the_task_before(task0_run, tmp_path):
    """The last checkpoint of task 0 holds task 0's importance: a fit resumed from it for task 1
    (with more epochs) trains task 1 protected from its first step and ends task 1 on its data."""
    module, spg, loaders, folder = task0_run
    start = {n: p.detach().clone() for n, p in module.net.named_parameters()}  # the checkpoint's
    control, _ = _copy_for_task1(module, spg)
    tracks = [_Parameters(), _Parameters()]
    _fit(control, loaders[1], tmp_path / "control", [tracks[0]], max_steps=1)

    resumed = _module(seed=1)
    resumed.task = 1
    resumed_spg = SPG(resumed.net, heads=resumed.net.heads)
    _fit(
        resumed,
        loaders[1],
        tmp_path / "task1",
        [SPGCallback(resumed_spg), tracks[1]],
        ckpt_path=folder / "epoch=1.ckpt",
        max_epochs=4,
    )
    assert len(tracks[1].after) == 6  # epochs 2 and 3: task 1's
    for name, p in start.items():
        unprotected = tracks[0].after[0][name] - p
        torch.testing.assert_close(
            tracks[1].after[0][name] - p, unprotected * _factor(spg, name), rtol=1e-9, atol=1e-15
        )
    assert resumed_spg.tasks_finished == 2
    oracle = _oracle(resumed, spg, 1, loaders[1])
    for name, a in oracle.importance.items():
        assert torch.equal(resumed_spg.importance[name], a), name


def _stopped(_batch):
    raise RuntimeError("the process stopped here")


def test_a_checkpoint_written_before_its_task_ended_is_not_trained_on(tmp_path):
    """A fit that stops between its last checkpoint and end_task leaves a checkpoint whose task
    is not in SPG's state: training on from it is refused; resumed with nothing left to train, the
    task ends."""
    loaders = _loaders()
    module = _module(seed=0)
    callback = SPGCallback(SPG(module.net, heads=module.net.heads), prepare_batch=_stopped)
    with pytest.raises(RuntimeError, match="the process stopped here"):
        _fit(module, loaders[0], tmp_path, [callback, _checkpoints(tmp_path)])
    last = tmp_path / "epoch=1.ckpt"
    saved = torch.load(last, weights_only=True)["callbacks"]["SPGCallback"]
    assert saved["spg"]["tasks_finished"] == 0 and saved["over"] is True
    assert saved["ended"] is False
    assert (
        torch.load(tmp_path / "epoch=0.ckpt", weights_only=True)["callbacks"]["SPGCallback"]["over"]
        is False
    )

    following = _module(seed=1)
    following.task = 1
    following_spg = SPG(following.net, heads=following.net.heads)
    with pytest.raises(
        RuntimeError,
        match="written after task 0's training had finished but before SPG measured task 0",
    ):
        _fit(
            following,
            loaders[1],
            tmp_path / "next",
            [SPGCallback(following_spg)],
            ckpt_path=last,
            max_epochs=4,
        )
    assert following.optimizers_made[-1].seen == []  # refused before any step

    again = _module(seed=1)
    again_spg = SPG(again.net, heads=again.net.heads)
    _fit(again, loaders[0], tmp_path / "again", [SPGCallback(again_spg)], ckpt_path=last)
    assert again_spg.tasks_finished == 1
    oracle = _oracle(module, SPG(copy.deepcopy(module.net), heads="heads"), 0, loaders[0])
    for name, a in oracle.importance.items():
        assert torch.equal(again_spg.importance[name], a), name


def test_a_lightning_adamw_is_protected_by_the_update_mask(after_task0, tmp_path):
    """mask="auto" masks AdamW's update: the first step moves each element exactly its keep factor
    (heads: the head scale) as far as the unprotected step; over the task, elements with A > 0.9
    move far less than those with A < 0.1."""
    module, spg, loaders = after_task0
    masked, masked_spg = _copy_for_task1(module, spg)
    control, _ = _copy_for_task1(module, spg)
    masked.adamw = control.adamw = True
    start = {n: p.detach().clone() for n, p in module.net.named_parameters()}
    tracks = [_Parameters(), _Parameters()]
    _fit(masked, loaders[1], tmp_path / "m", [SPGCallback(masked_spg), tracks[0]])
    _fit(control, loaders[1], tmp_path / "c", [tracks[1]])
    assert len(tracks[0].after) == len(tracks[1].after) == 6

    for name, p in start.items():
        unprotected = tracks[1].after[0][name] - p
        torch.testing.assert_close(
            tracks[0].after[0][name] - p, unprotected * _factor(spg, name), rtol=1e-9, atol=1e-15
        )
    sums = {"high": [0.0, 0.0], "low": [0.0, 0.0]}
    for name, a in spg.importance.items():
        for key, where in (("high", a > 0.9), ("low", a < 0.1)):
            for i, track in enumerate(tracks):
                sums[key][i] += float((track.after[-1][name] - start[name])[where].abs().sum())
    ratios = {key: m / c for key, (m, c) in sums.items()}
    assert ratios["high"] < 0.15 and ratios["low"] > 0.8, ratios


def _model_parallel(tensor_parallel: int) -> ModelParallelStrategy:
    """A ModelParallelStrategy as set up on processes whose mesh has ``tensor_parallel`` ranks per
    tensor-parallel group."""
    strategy = ModelParallelStrategy()
    strategy._device_mesh = {"tensor_parallel": SimpleNamespace(size=lambda: tensor_parallel)}
    return strategy


@pytest.mark.parametrize(
    ("strategy", "words"),
    [
        (lambda: FSDPStrategy(), "'fsdp' (FSDPStrategy) is FSDP1"),
        (lambda: DeepSpeedStrategy.__new__(DeepSpeedStrategy), "DeepSpeed"),
        (lambda: _model_parallel(2), "ModelParallelStrategy with a tensor-parallel size of 2"),
        (lambda: _model_parallel(1), "pass a function that builds SPG from the LightningModule"),
    ],
    ids=["fsdp", "deepspeed", "tensor_parallel", "model_parallel_spg_built_before_sharding"],
)
def test_strategies_spg_cannot_run_under_are_refused(after_task0, strategy, words):
    """Lightning's "fsdp" needs a GPU and its DeepSpeed strategy the deepspeed package, so the
    callback's check sees their strategy objects directly (FSDP2 under ModelParallelStrategy runs
    in tests/integrations/test_examples.py)."""
    module, spg, _ = after_task0
    trainer = SimpleNamespace(strategy=strategy())
    with pytest.raises(RuntimeError, match=re.escape(words)):
        SPGCallback(spg).setup(trainer, module, "fit")


def test_a_function_that_builds_spg_is_called_once_when_the_first_fit_starts(tmp_path):
    """The way SPG is given under FSDP2 (tests/integrations/test_examples.py), here on one process:
    built from the LightningModule when the first fit starts, then kept; its options are checked
    when the callback is made, what it returns when it is called."""
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'loss'.*loss_fn"):
        SPGCallback(lambda module: SPG(module.net, heads=module.net.heads), loss=F.cross_entropy)
    module, loaders = _module(seed=0), _loaders()
    module.adamw = True
    built = []

    def build(pl_module):
        built.append(SPG(pl_module.net, heads=pl_module.net.heads))
        return built[-1]

    callback = SPGCallback(build)
    assert callback.spg is None
    for task in range(2):
        module.task = task
        _fit(module, loaders[task], tmp_path / f"task{task}", [callback])
    assert len(built) == 1 and callback.spg is built[0] and built[0].tasks_finished == 2
    wrong = SPGCallback(lambda pl_module: pl_module.net)
    with pytest.raises(TypeError, match=r"needs an spg_fast\.SPG object, got MultiHeadNet"):
        _fit(module, loaders[0], tmp_path / "wrong", [wrong])
