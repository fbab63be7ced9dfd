"""The importance pass's schedules against the literal per-head passes: exact sums, one
trunk forward per batch, randomness detection, head groups under a memory budget, and the
pass's errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spg_fast._importance_pass import ImportancePass, Trace
from spg_fast._shared_forward import TrunkMemo, head_free_modules
from tests.helpers import MultiHeadNet, make_tasks


def _literal_sums(model: nn.Module, batches: list, k: int) -> list[list[torch.Tensor]]:
    """Per head 0..k, the spec's gradient sums taken the authors' way: zero .grad, backward
    every batch."""
    shared = list(model.trunk.parameters())
    sums = []
    for head in range(k + 1):
        model.zero_grad(set_to_none=True)
        for x, y in batches:
            out = model(x, head)
            (F.cross_entropy(out, y) if head == k else out.sum()).backward()
        sums.append([p.grad.to_dense().clone() for p in shared])
    model.zero_grad(set_to_none=True)
    return sums


def _engine(model: nn.Module, batches: list, k: int, **options) -> ImportancePass:
    return ImportancePass(
        model,
        list(model.trunk.parameters()),
        model.heads.parameters(),
        list(range(k + 1)),
        batches,
        model,
        lambda head: F.cross_entropy if head == k else (lambda out, _y: out.sum()),
        lambda batch: batch,
        **options,
    )


def _run(engine: ImportancePass) -> dict[int, list[torch.Tensor | None]]:
    """Each head's sums, copied."""
    return {
        done.head: [None if s is None else s.clone() for s in done.sums] for done in engine.run()
    }


def _bytes_per_head(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.trunk.parameters())


def _float64_setup(k: int, dropout: float = 0.0, seed: int = 0):
    torch.manual_seed(seed)
    model = MultiHeadNet(n_tasks=5, dropout=dropout).double().train()
    batches = [(x.double(), y) for x, y in make_tasks(n_tasks=1, n_batches=4, seed=seed)[0]]
    return model, batches


def _calls(module: nn.Module) -> list[int]:
    count = [0]
    module.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


@pytest.mark.parametrize("k", range(5))
def test_shared_forward_equals_the_per_head_passes_exactly_for_every_group_size(k):
    model, batches = _float64_setup(k)
    want = _literal_sums(model, batches, k)
    for size in range(1, k + 2):
        trunk_calls = _calls(model.trunk[0])
        engine = _engine(model, batches, k, memory_budget=size * _bytes_per_head(model))
        got = _run(engine)
        assert sorted(got) == list(range(k + 1))
        for head in range(k + 1):
            for g, w in zip(got[head], want[head], strict=True):
                assert torch.equal(g, w), (k, size, head)
        groups = math.ceil((k + 1) / size)
        assert engine.report.group_size == size and engine.report.passes == groups
        assert engine.report.shared_forward == (size > 1)
        # The trunk ran once per batch and group. On a group's first batch every other head's
        # trunk call came from the memo; later, every other head was evaluated on the input
        # captured from the group's first head.
        assert trunk_calls[0] == len(batches) * groups
        assert engine.report.memo_hits == k + 1 - groups
        assert engine.report.captured == (len(batches) - 1) * (k + 1 - groups)
        want_strategy = "head capture" if size > 1 else "per-head forwards"
        assert engine.report.strategy == want_strategy and engine.report.fallback == ""


def test_per_head_schedule_runs_a_forward_per_head_and_batch():
    model, batches = _float64_setup(3)
    trunk_calls = _calls(model.trunk[0])
    engine = _engine(model, batches, 3, shared_forward=False)
    got = _run(engine)
    assert trunk_calls[0] == len(batches) * 4 and engine.report.passes == 4
    assert not engine.report.shared_forward and engine.report.reason == "forced by shared_forward"
    want = _literal_sums(model, batches, 3)
    assert all(
        torch.equal(g, w) for head in range(4) for g, w in zip(got[head], want[head], strict=True)
    )


@pytest.mark.parametrize("shared_forward", [False, True])
def test_gradients_after_the_first_batch_are_added_by_hooks_as_backward_produces_them(
    monkeypatch, shared_forward
):
    """From the second batch on, autograd.grad hands back stride-0 zeros in place of the
    gradients (their memory was freed during backward, once added), and the sums are still the
    literal ones."""
    model, batches = _float64_setup(2)
    returned = []
    grad = torch.autograd.grad

    def recording_grad(*args, **kwargs):
        out = grad(*args, **kwargs)
        returned.append(out)
        return out

    monkeypatch.setattr(torch.autograd, "grad", recording_grad)
    got = _run(_engine(model, batches, 2, shared_forward=shared_forward))
    monkeypatch.undo()
    want = _literal_sums(model, batches, 2)
    assert all(
        torch.equal(g, w) for head in range(3) for g, w in zip(got[head], want[head], strict=True)
    )
    assert len(returned) == 3 * len(batches)
    # The shared forward calls autograd.grad batch by batch (3 heads each), the per-head passes head
    # by head.
    batch_of = (lambda i: i // 3) if shared_forward else (lambda i: i % len(batches))
    first = [out for i, out in enumerate(returned) if batch_of(i) == 0]
    later = [out for i, out in enumerate(returned) if batch_of(i) > 0]
    assert len(first) == 3
    assert all(g.stride() != (0,) * g.dim() or g.numel() < 2 for out in first for g in out)
    assert all(
        g.dim() and g.stride() == (0,) * g.dim() and not g.any() for out in later for g in out
    )


def test_the_pass_leaves_no_hooks_and_runs_the_users_first():
    model, batches = _float64_setup(1)
    weight = model.trunk[0].weight
    seen = []
    user = weight.register_hook(lambda g: seen.append(g.clone()))
    before = dict(weight._backward_hooks)
    got = _run(_engine(model, batches, 1))
    assert dict(weight._backward_hooks) == before
    assert len(seen) == 2 * len(
        batches
    )  # the user's hook saw every real gradient, none of the zeros
    assert torch.equal(sum(seen[0::2]), got[0][0]) and torch.equal(sum(seen[1::2]), got[1][0])
    with pytest.raises(FloatingPointError):
        _run(_engine(model, _nan_at(1, batches), 1))
    assert dict(weight._backward_hooks) == before
    user.remove()


def test_default_budget_puts_a_small_model_in_one_group():
    model, batches = _float64_setup(4)
    engine = _engine(model, batches, 4)
    _run(engine)
    assert (
        engine.report.shared_forward and engine.report.group_size == 5 and engine.report.passes == 1
    )
    assert engine.report.reason == "no random draws in the first forward"


def test_dropout_modules_keep_the_per_head_passes_by_default():
    model, batches = _float64_setup(2, dropout=0.5)
    torch.manual_seed(7)
    auto = _engine(model, batches, 2)
    got = _run(auto)
    assert (
        not auto.report.shared_forward
        and "random modules in train mode (trunk.2)" in auto.report.reason
    )
    torch.manual_seed(7)
    want = _run(_engine(model, batches, 2, shared_forward=False))
    assert all(torch.equal(g, w) for h in range(3) for g, w in zip(got[h], want[h], strict=True))


class FunctionalDropoutNet(MultiHeadNet):
    """Dropout drawn inside forward with F.dropout: no module reveals it, the generator's
    state does."""

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return self.heads[task](F.dropout(self.trunk(x), 0.3, self.training))


def test_random_draws_in_the_forward_are_detected_and_give_the_per_head_passes():
    torch.manual_seed(0)
    model = FunctionalDropoutNet(n_tasks=4).double().train()
    batches = [(x.double(), y) for x, y in make_tasks(n_tasks=1, n_batches=3)[0]]
    torch.manual_seed(11)
    auto = _engine(model, batches, 3)
    got = _run(auto)
    assert (
        not auto.report.shared_forward
        and auto.report.reason == "the first forward drew random numbers"
    )
    assert auto.report.passes == 4
    torch.manual_seed(11)
    want = _run(_engine(model, batches, 3, shared_forward=False))
    # The probe's forward is head 0's first forward, so the random stream, and the result, are those
    # of the per-head passes.
    assert all(torch.equal(g, w) for h in range(4) for g, w in zip(got[h], want[h], strict=True))


def test_shared_forward_can_be_forced_with_dropout():
    model, batches = _float64_setup(3, dropout=0.5)
    trunk_calls = _calls(model.trunk[0])
    engine = _engine(model, batches, 3, shared_forward=True)
    _run(engine)
    assert engine.report.shared_forward and trunk_calls[0] == len(batches)


class InPlaceNet(nn.Module):
    """Writes into the trunk's output in place before the head: a memoised output must not be
    reused then."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12))
        self.heads = nn.ModuleList(nn.Linear(12, 3) for _ in range(3))

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return self.heads[task](self.trunk(x).mul_(2))


def test_memo_recomputes_an_output_modified_in_place():
    """The memo answers nothing (each head's forward modifies the trunk's output); the head
    capture, which takes the head's input after the modification, still shares the later
    batches' forwards."""
    torch.manual_seed(0)
    model = InPlaceNet().double()
    batches = [(x.double(), y) for x, y in make_tasks(n_tasks=1)[0]]
    trunk_calls = _calls(model.trunk[0])
    engine = _engine(model, batches, 2, shared_forward=True)
    got = _run(engine)
    assert engine.report.memo_hits == 0 and engine.report.strategy == "head capture"
    assert trunk_calls[0] == 3 + (len(batches) - 1)
    want = _literal_sums(model, batches, 2)
    assert all(torch.equal(g, w) for h in range(3) for g, w in zip(got[h], want[h], strict=True))


class EmbeddingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Embedding(20, 4, sparse=True), nn.Flatten(), nn.Linear(12, 8), nn.Tanh()
        )
        self.heads = nn.ModuleList(nn.Linear(8, 3) for _ in range(2))

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return self.heads[task](self.trunk(x))


def test_sparse_gradients_are_summed_densely():
    torch.manual_seed(0)
    model = EmbeddingNet().double()
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randint(0, 20, (5, 3), generator=g), torch.randint(0, 3, (5,), generator=g))
        for _ in range(3)
    ]
    got = _run(_engine(model, batches, 1))
    want = _literal_sums(model, batches, 1)
    # .grad sums sparse gradients sparsely (another order of additions): equal to float64 rounding.
    for h in range(2):
        for g, w in zip(got[h], want[h], strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-14)


def test_unused_parameters_report_no_gradient():
    model, batches = _float64_setup(1)
    model.trunk.register_parameter("unused", nn.Parameter(torch.zeros(2, dtype=torch.float64)))
    got = _run(_engine(model, batches, 1))
    unused = [n for n, _ in model.trunk.named_parameters()].index("unused")
    for sums in got.values():
        assert [i for i, s in enumerate(sums) if s is None] == [unused]


def test_memo_patches_only_head_free_modules_and_restores_them():
    model = MultiHeadNet()
    assert head_free_modules(model, model.heads.parameters()) == [model.trunk]
    assert head_free_modules(model, [model.heads[1].weight]) == [
        model.trunk,
        model.heads[0],
        model.heads[2],
    ]
    with TrunkMemo(model, model.heads.parameters()):
        assert "forward" in model.trunk.__dict__
    assert "forward" not in model.trunk.__dict__


def test_memo_keys_on_argument_identity_and_value():
    model = MultiHeadNet()
    calls = _calls(model.trunk[0])
    x = torch.randn(2, 6)
    with TrunkMemo(model, model.heads.parameters()) as memo:
        a, b = model.trunk(x), model.trunk(x)
        c = model.trunk(x.clone())
        memo.clear()
        d = model.trunk(x)
    assert a is b and c is not a and d is not a and calls[0] == 3 and memo.hits == 1


def _nan_at(batch_index: int, batches: list) -> list:
    bad = [(x.clone(), y) for x, y in batches]
    bad[batch_index][0][1, 2] = float("nan")
    return bad


def test_non_finite_loss_names_the_batch_and_heads():
    model, batches = _float64_setup(1)
    with pytest.raises(
        FloatingPointError,
        match=r"non-finite \(NaN or Inf\) at batch 2 \(counting from 0\) for "
        r"head 0, head 1; check that batch's data",
    ):
        _run(_engine(model, _nan_at(2, batches), 1))
    assert "forward" not in model.trunk.__dict__


class PoisonMarked(torch.autograd.Function):
    """Identity whose backward is Inf for a batch marked by a large input value: a non-finite
    gradient under a finite loss, the same every time the batch comes round."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.marked = bool(x.abs().max() > 100)
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("inf") if ctx.marked else grad


class PoisonNet(MultiHeadNet):
    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return self.heads[task](self.trunk[2:](self.trunk[1](PoisonMarked.apply(self.trunk[0](x)))))


@pytest.mark.parametrize("shared_forward", [False, True])
def test_non_finite_gradient_is_traced_to_its_batch(shared_forward):
    torch.manual_seed(0)
    model = PoisonNet(n_tasks=3).double()
    batches = [(x.double(), y) for x, y in make_tasks(n_tasks=1, n_batches=4)[0]]
    batches[2][0][0, 0] = 1e4  # finite, and the loss stays finite (tanh saturates)
    results = {
        done.head: done for done in _engine(model, batches, 2, shared_forward=shared_forward).run()
    }
    for head in range(3):
        assert (
            results[head].nonfinite == Trace(2, True) and results[head].first_nonfinite_batch == 2
        )
        assert not bool(torch.isfinite(results[head].sums[0]).all())
    assert "forward" not in model.trunk.__dict__


def test_a_gradient_that_does_not_repeat_is_not_traced():
    model, batches = _float64_setup(0)
    seen = [0]

    def poison_second_call(grad: torch.Tensor) -> torch.Tensor:
        seen[0] += 1
        return grad * float("inf") if seen[0] == 2 else grad

    model.trunk[3].bias.register_hook(poison_second_call)
    (done,) = _engine(model, batches, 0).run()
    assert done.nonfinite == Trace(None, False) and done.first_nonfinite_batch is None
    assert seen[0] == 2 * len(batches)  # the pass, then its repeat


class ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * 2e38


def test_a_sum_that_overflows_is_told_apart_from_a_bad_batch():
    """Each batch's float32 gradient is 2e38, finite; two of them sum past float32's 3.4e38."""
    model = MultiHeadNet(n_tasks=1)
    params = list(model.trunk.parameters())
    batches = make_tasks(n_tasks=1, n_batches=2)[0]
    engine = ImportancePass(
        model,
        params,
        model.heads.parameters(),
        [0],
        batches,
        model,
        lambda head: lambda out, y: ScaleGradient.apply(params[-1]).sum() + out.sum() * 0,
        lambda batch: batch,
    )
    (done,) = engine.run()
    assert done.nonfinite == Trace(None, True) and torch.isinf(done.sums[-1]).all()


@pytest.mark.parametrize(
    "loss, message",
    [
        (
            lambda out, y: F.cross_entropy(out, y, reduction="none"),
            r"head 0 must be a scalar tensor, got shape \(8,\)",
        ),
        (lambda out, y: 1.0, "head 0 must be a scalar tensor, got float"),
        (lambda out, y: out.detach().sum(), "does not depend on any trainable parameter"),
    ],
)
def test_bad_losses_are_explained(loss, message):
    model, batches = _float64_setup(0)
    engine = ImportancePass(
        model,
        list(model.trunk.parameters()),
        model.heads.parameters(),
        [0],
        batches,
        model,
        lambda head: loss,
        lambda batch: batch,
    )
    with pytest.raises(ValueError, match=message):
        _run(engine)


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"shared_forward": "yes"}, TypeError, "shared_forward must be None"),
        ({"memory_budget": -1}, ValueError, "memory_budget must be None or a number of bytes"),
        ({"memory_budget": 1.5}, ValueError, "memory_budget must be None or a number of bytes"),
    ],
)
def test_bad_options_are_named(options, error, message):
    model, batches = _float64_setup(0)
    with pytest.raises(error, match=message):
        _engine(model, batches, 0, **options)


def test_empty_loader_is_an_error():
    model, _ = _float64_setup(1)
    with pytest.raises(ValueError, match="yielded no batches"):
        _run(_engine(model, [], 1))


def test_benchmark_writes_its_tables(tmp_path):
    """bench.importance_pass end to end at the smallest size (its timings are not checked here)."""
    import csv
    import json

    from bench.importance_pass import main

    threads = torch.get_num_threads()
    try:
        main(
            [
                "--models",
                "mlp-flat",
                "--ks",
                "0,1",
                "--batches",
                "1",
                "--rounds",
                "1",
                "--stats-repeats",
                "1",
                "--backward-rounds",
                "1",
                "--threads",
                "1",
                "--out",
                str(tmp_path),
            ]
        )
    finally:
        torch.set_num_threads(threads)
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert {(r["k"], r["config"]) for r in rows} >= {
        ("0", "floor"),
        ("1", "spg-fast auto"),
        ("1", "spg-fast shared, 2 groups"),
    }
    auto = next(r for r in rows if r["k"] == "1" and r["config"] == "spg-fast auto")
    assert auto["shared_forward"] == "True" and auto["group_size"] == "2"
    assert auto["strategy"] == "head capture" and auto["threads"] == "1"
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["statistics"]) == 3 and len(results["backward"]) == 3
    text = (tmp_path / "results.md").read_text()
    assert "## Importance step of one head" in text and "## Backward through the shared" in text
