"""The head capture: a model written the authors' way (layers as attributes, functional ReLU and
pooling in ``forward``) shares each batch's forward among the heads, with sums equal to the
per-head passes in float64; every layout the capture cannot verify falls back to the trunk memo
with the same sums and says why."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spg_fast import _shared_forward
from spg_fast._importance_pass import ImportancePass
from spg_fast._shared_forward import head_modules, same_graph

N_HEADS = 4


class FlatNet(nn.Module):
    """The authors' layout at toy size: conv and linear layers as attributes, ReLU, pooling and
    flattening as functional calls, ``self.heads[t](h)`` at the end."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3)
        self.c2 = nn.Conv2d(4, 6, 2)
        self.fc1 = nn.Linear(6 * 2 * 2, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.heads = nn.ModuleList(nn.Linear(hidden, 3) for _ in range(N_HEADS))

    def features(self, x: Tensor) -> Tensor:
        h = F.max_pool2d(F.relu(self.c1(x)), 2)
        h = F.relu(self.c2(h))
        h = F.relu(self.fc1(h.flatten(1)))
        return torch.tanh(self.fc2(h))

    def forward(self, x: Tensor, t: int) -> Tensor:
        return self.heads[t](self.features(x))


def _shared(model: nn.Module) -> list[nn.Parameter]:
    heads = {id(p) for p in model.heads.parameters()}
    return [p for p in model.parameters() if id(p) not in heads]


def _batches(n: int = 4, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(8, 2, 8, 8, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (8,), generator=g),
        )
        for _ in range(n)
    ]


def _model(cls: type[nn.Module] = FlatNet) -> nn.Module:
    torch.manual_seed(0)
    return cls().double().train()


def _loss_for(k: int):
    return lambda head: F.cross_entropy if head == k else (lambda out, _y: out.sum())


def _literal(model: nn.Module, batches: list, k: int) -> list[list[Tensor | None]]:
    """Per head 0..k, the gradient sums the authors' way: zero .grad, backward every batch."""
    shared = _shared(model)
    sums = []
    for head in range(k + 1):
        model.zero_grad(set_to_none=True)
        for x, y in batches:
            _loss_for(k)(head)(model(x, head), y).backward()
        sums.append([None if p.grad is None else p.grad.clone() for p in shared])
    model.zero_grad(set_to_none=True)
    return sums


def _engine(model: nn.Module, batches: list, k: int, **options) -> ImportancePass:
    return ImportancePass(
        model,
        _shared(model),
        model.heads.parameters(),
        list(range(k + 1)),
        batches,
        model,
        _loss_for(k),
        lambda batch: batch,
        **options,
    )


def _sums(engine: ImportancePass) -> list[list[Tensor | None]]:
    got = {
        done.head: [None if s is None else s.clone() for s in done.sums] for done in engine.run()
    }
    return [got[h] for h in sorted(got)]


def _equal(got: list[list[Tensor | None]], want: list[list[Tensor | None]]) -> bool:
    return all(
        (g is None and w is None) or (g is not None and w is not None and torch.equal(g, w))
        for row_g, row_w in zip(got, want, strict=True)
        for g, w in zip(row_g, row_w, strict=True)
    )


def _calls(module: nn.Module) -> list[int]:
    count = [0]
    module.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


@pytest.mark.parametrize("k", [1, 3])
def test_flat_model_shares_the_forward_and_equals_the_per_head_passes(k):
    model, batches = _model(), _batches()
    want = _literal(model, batches, k)
    for size in range(2, k + 2):
        c2_calls, fc2_calls = _calls(model.c2), _calls(model.fc2)
        per_head = _sums(_engine(model, batches, k, shared_forward=False))
        engine = _engine(model, batches, k, memory_budget=size * _bytes(model))
        got = _sums(engine)
        assert _equal(got, want) and _equal(per_head, want), (k, size)
        report = engine.report
        assert report.strategy == "head capture" and report.fallback == "", report
        groups = -(-(k + 1) // size)
        others = k + 1 - groups  # heads after the first of each group
        # The first batch runs every head's own forward (the first conv layer's call on the same
        # input comes from the memo); later batches only the group's first head's.
        assert report.captured == (len(batches) - 1) * others
        assert report.memo_hits == others
        assert fc2_calls[0] - (k + 1) * len(batches) == len(batches) * groups + others
        assert c2_calls[0] - (k + 1) * len(batches) == len(batches) * groups + others


def _bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in _shared(model))


class ScaledPerHead(FlatNet):
    """Work specific to the head before it: the heads' inputs differ."""

    def forward(self, x: Tensor, t: int) -> Tensor:
        return self.heads[t](self.features(x) * (t + 1))


class FilmPerHead(FlatNet):
    """A shared per-task scale, all ones: every head's input has the same values, but each head's
    gradient goes to its own row of ``film`` (a capture from head 0 would send them all to row
    0)."""

    def __init__(self) -> None:
        super().__init__()
        self.film = nn.Parameter(torch.ones(N_HEADS, 16))

    def forward(self, x: Tensor, t: int) -> Tensor:
        return self.heads[t](self.features(x) * self.film[t])


class DetachedForLaterHeads(FlatNet):
    """The same values for every head, but only head 0's input carries the trunk's gradient."""

    def forward(self, x: Tensor, t: int) -> Tensor:
        h = self.features(x)
        return self.heads[t](h if t == 0 else h.detach())


class HeadTwice(FlatNet):
    """Calls its head twice (the first output discarded): the forward's output is the head's
    output, but the head ran more than once."""

    def forward(self, x: Tensor, t: int) -> Tensor:
        h = self.features(x)
        self.heads[t](h)
        return self.heads[t](h)


class PairHead(nn.Module):
    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, 3)

    def forward(self, pair: tuple[Tensor, Tensor]) -> Tensor:
        return self.linear(pair[0]) * pair[1]


class TupleInput(FlatNet):
    """A head module that takes a tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleList(PairHead() for _ in range(N_HEADS))

    def forward(self, x: Tensor, t: int) -> Tensor:
        h = self.features(x)
        return self.heads[t]((h, h.mean(1, keepdim=True)))


class PostProcessed(FlatNet):
    """Returns something computed from the head's output."""

    def forward(self, x: Tensor, t: int) -> Tensor:
        return F.log_softmax(self.heads[t](self.features(x)), 1)


class OutputChangedInPlace(FlatNet):
    def forward(self, x: Tensor, t: int) -> Tensor:
        return self.heads[t](self.features(x)).mul_(2)


class NoHeadModules(FlatNet):
    """The heads' weights live on the model itself, next to shared parameters: no module holds
    only head parameters."""

    def __init__(self) -> None:
        super().__init__()
        del self.heads
        self.head_weight = nn.Parameter(torch.randn(N_HEADS, 3, 16) * 0.1)

    @property
    def heads(self) -> nn.Module:  # for the tests' helpers: the head parameters
        holder = nn.Module()
        holder.weight = self.head_weight
        return holder

    def forward(self, x: Tensor, t: int) -> Tensor:
        return F.linear(self.features(x), self.head_weight[t])


@pytest.mark.parametrize(
    "cls, why",
    [
        (ScaledPerHead, "head 1 on the first batch: its head module's input differs from head 0's"),
        (FilmPerHead, "computed by other operations, parameters or saved values than head 0's"),
        (DetachedForLaterHeads, "computed by other operations, parameters or saved values"),
        (HeadTwice, "head 0 on the first batch: the forward called head modules 2 times"),
        (TupleInput, "the head module was called with other than one tensor argument"),
        (PostProcessed, "the forward's output is not its head module's output"),
        (OutputChangedInPlace, "changed its head module's input or output in place"),
        (NoHeadModules, "no module's parameters are all head parameters"),
    ],
)
@pytest.mark.parametrize("shared_forward", [None, True])
def test_layouts_the_capture_cannot_verify_fall_back_with_the_same_sums(cls, why, shared_forward):
    model, batches = _model(cls), _batches()
    want = _literal(model, batches, 2)
    engine = _engine(model, batches, 2, shared_forward=shared_forward)
    got = _sums(engine)
    assert _equal(got, want)
    report = engine.report
    assert report.shared_forward and report.strategy == "trunk memo" and report.captured == 0
    assert why in report.fallback


def test_without_the_graph_check_the_capture_would_be_wrong(monkeypatch):
    """The parity tests can fail: a capture that trusted equal values alone would send every
    head's gradient to ``film[0]``."""
    monkeypatch.setattr(_shared_forward, "same_graph", lambda a, b: True)
    model, batches = _model(FilmPerHead), _batches()
    want = _literal(model, batches, 2)
    engine = _engine(model, batches, 2)
    got = _sums(engine)
    assert engine.report.strategy == "head capture" and not _equal(got, want)


class ChangesOnSmallBatches(FlatNet):
    """Post-processes the output of a batch of another size: those batches cannot use the
    capture and run every head's forward; the others can."""

    def forward(self, x: Tensor, t: int) -> Tensor:
        out = self.heads[t](self.features(x))
        return out if len(x) == 8 else out * 1.0


def test_a_later_batch_the_capture_does_not_fit_runs_its_own_forwards():
    model, batches = _model(ChangesOnSmallBatches), _batches(4)
    batches[2] = (batches[2][0][:5], batches[2][1][:5])
    want = _literal(model, batches, 2)
    engine = _engine(model, batches, 2)
    assert _equal(_sums(engine), want)
    report = engine.report
    assert report.strategy == "head capture" and report.captured == 2 * 2
    assert report.fallback.startswith("batch 2: the forward's output is not its head module's")


class NestedHeads(FlatNet):
    """Each head a small network of its own: one top-level call, inner calls do not count."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)) for _ in range(N_HEADS)
        )


def test_heads_with_submodules_are_captured_at_their_outer_module():
    model, batches = _model(NestedHeads), _batches()
    want = _literal(model, batches, 3)
    engine = _engine(model, batches, 3)
    assert _equal(_sums(engine), want) and engine.report.strategy == "head capture"


def test_user_hooks_on_the_heads_run_once_per_head_call():
    """A pre-hook that changes the head's input and a hook that changes its output: the capture
    takes the input before the user's pre-hook, so calling the head again applies each hook
    once, as the forward did."""
    model, batches = _model(), _batches()
    for head in model.heads:
        head.register_forward_pre_hook(lambda _m, args: (args[0] * 2,))
        head.register_forward_hook(lambda _m, _args, out: out - 1)
    want = _literal(model, batches, 2)
    engine = _engine(model, batches, 2)
    assert _equal(_sums(engine), want) and engine.report.strategy == "head capture"


def test_the_capture_leaves_no_hooks_on_success_or_error():
    model, batches = _model(), _batches()
    before = [(dict(h._forward_pre_hooks), dict(h._forward_hooks)) for h in model.modules()]
    _sums(_engine(model, batches, 2))
    bad = [(x.clone(), y) for x, y in batches]
    bad[2][0][0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        _sums(_engine(model, bad, 2))
    after = [(dict(h._forward_pre_hooks), dict(h._forward_hooks)) for h in model.modules()]
    assert after == before
    assert all("forward" not in m.__dict__ for m in model.modules())


class FunctionalDropout(FlatNet):
    def forward(self, x: Tensor, t: int) -> Tensor:
        return self.heads[t](F.dropout(self.features(x), 0.5, self.training))


def _same_draws_per_batch(model: nn.Module, batches: list, k: int) -> list[list[Tensor | None]]:
    """Per head, the gradient sums when every head of a batch starts from the same random state
    (the shared forward's meaning under forced sharing)."""
    shared = _shared(model)
    sums: list[list[Tensor | None]] = [[None] * len(shared) for _ in range(k + 1)]
    for x, y in batches:
        state = torch.get_rng_state()
        for head in range(k + 1):
            torch.set_rng_state(state)
            grads = torch.autograd.grad(_loss_for(k)(head)(model(x, head), y), shared)
            sums[head] = [g if s is None else s + g for s, g in zip(sums[head], grads, strict=True)]
    return sums


def test_forced_sharing_with_dropout_gives_every_head_of_a_batch_the_same_draws():
    model, batches = _model(FunctionalDropout), _batches()
    torch.manual_seed(5)
    want = _same_draws_per_batch(model, batches, 2)
    after_want = torch.get_rng_state()
    torch.manual_seed(5)
    engine = _engine(model, batches, 2, shared_forward=True)
    got = _sums(engine)
    assert engine.report.strategy == "head capture"
    assert _equal(got, want)
    # One forward's draws per batch, as the shared forward makes them.
    assert torch.equal(torch.get_rng_state(), after_want)


def test_dropout_in_a_flat_forward_keeps_the_per_head_passes_by_default():
    model, batches = _model(FunctionalDropout), _batches()
    torch.manual_seed(3)
    auto = _engine(model, batches, 2)
    got = _sums(auto)
    assert auto.report.strategy == "per-head forwards" and not auto.report.shared_forward
    torch.manual_seed(3)
    assert _equal(got, _sums(_engine(model, batches, 2, shared_forward=False)))


def test_head_modules_are_those_holding_only_head_parameters():
    model = NestedHeads()
    found = head_modules(model, model.heads.parameters())
    assert model.heads in found and model.heads[0] in found and model.heads[0][0] in found
    assert model.heads[0][1] not in found  # no parameters
    assert model not in found and model.fc2 not in found


def test_same_graph_compares_operations_parameters_and_saved_values():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 3))
    other = nn.Parameter(w.detach().clone())
    x = torch.randn(2, 4)
    base = torch.tanh(x @ w)
    assert same_graph(base, torch.tanh(x @ w))
    assert not same_graph(base, torch.tanh(x @ other))  # another parameter
    assert not same_graph(base, torch.sigmoid(x @ w))  # another operation
    assert not same_graph(base, torch.tanh(x @ w * 1))  # more operations
    assert not same_graph(base, torch.tanh((x + 1) @ w))  # another saved input
    rows = nn.Parameter(torch.ones(3, 3))
    assert not same_graph(base * rows[0], base * rows[1])  # another saved index
    assert same_graph(base * rows[1], base * rows[1])
    assert not same_graph(base, base.detach())
    # A node shared in one graph and duplicated in the other: not the same backward.
    y = x @ w
    assert same_graph(y + y, (x @ w) + (x @ w)) is False
