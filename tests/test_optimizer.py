"""``SPG.wrap`` and ``SPG.attach`` against the spec and against the torch optimizer protocol."""

from __future__ import annotations

import io
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spg_fast import SPG, SPGOptimizer, optim
from tests.helpers import MultiHeadNet, make_tasks, train_literal

EPOCHS = 4


def _fresh(seed: int = 0) -> MultiHeadNet:
    torch.manual_seed(seed)
    return MultiHeadNet()


def _train(mode: str, make_optimizer, tasks, model: MultiHeadNet | None = None, mask: str = "auto"):
    """Train through the public integration exactly as a user would (``mode`` wrap or attach with
    ``mask``), or mask by hand (``manual``: the gradient; ``manual-update``: the change each step
    made, written out); returns the model, SPG and optimizer."""
    model = model or _fresh()
    spg = SPG(model, heads=model.heads)
    base = make_optimizer(model.parameters())
    opt = spg.wrap(base, mask=mask) if mode == "wrap" else base
    if mode == "attach":
        spg.attach(base, mask=mask)
    for task, batches in enumerate(tasks):
        for _ in range(EPOCHS):
            for x, y in batches:
                opt.zero_grad()
                F.cross_entropy(model(x, task), y).backward()
                if mode == "manual":
                    spg.mask_gradients()
                if mode == "manual-update":
                    _step_and_scale_the_change(spg, opt)
                else:
                    opt.step()
        spg.end_task(task, batches)
    return model, spg, opt


@torch.no_grad()
def _step_and_scale_the_change(spg: SPG, opt: torch.optim.Optimizer) -> None:
    """The update mask written out: step, then ``p = before + keep * (p - before)``."""
    params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
    before = [p.clone() for p in params]
    opt.step()
    if spg.head_scale is None:
        return
    names = {p: n for n, p in spg.model.named_parameters()}
    keeps = spg.keep_factors
    for p, b in zip(params, before, strict=True):
        keep = keeps.get(names[p], spg.head_scale)
        p.copy_(b + keep * (p - b))


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_wrap_attach_and_the_literal_spec_train_the_same_weights():
    tasks = make_tasks()
    sgd = lambda params: torch.optim.SGD(params, lr=0.1)  # noqa: E731
    wrapped, spg, _ = _train("wrap", sgd, tasks)
    attached, _, _ = _train("attach", sgd, tasks)
    _assert_same_weights(wrapped, attached)

    literal = _fresh()
    literal_importance = train_literal(literal, tasks, EPOCHS, lr=0.1)
    # The literal loop standardises in float32 and takes a float32 mean for the head scale, the
    # library in float64: the two differ by float32 rounding, which training carries into the
    # weights at about 1e-7.
    for (name, p), q in zip(wrapped.named_parameters(), literal.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    for name, a in spg.importance.items():
        torch.testing.assert_close(a, literal_importance[name], rtol=0, atol=1e-5, msg=name)
    # The protection is real: the trunk moved less on later tasks than an unmasked run moves it.
    unmasked, _, _ = _train("none", sgd, tasks)
    first_task_only, _, _ = _train("none", sgd, tasks[:1])
    moved = lambda m: (m.trunk[0].weight - first_task_only.trunk[0].weight).norm()  # noqa: E731
    assert moved(wrapped) < 0.9 * moved(unmasked)


OPTIMIZERS = [
    lambda p: torch.optim.Adam(p, lr=0.01),
    lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1, foreach=True),
    lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    lambda p: torch.optim.RMSprop(p, lr=0.01),
]
OPTIMIZER_IDS = ["adam", "adamw-foreach", "sgd-nesterov-wd", "rmsprop"]


@pytest.mark.parametrize("make_optimizer", OPTIMIZERS, ids=OPTIMIZER_IDS)
def test_any_optimizer_with_the_gradient_mask_equals_masking_by_hand(make_optimizer):
    tasks = make_tasks()
    wrapped, _, _ = _train("wrap", make_optimizer, tasks, mask="gradient")
    attached, _, _ = _train("attach", make_optimizer, tasks, mask="gradient")
    manual, _, _ = _train("manual", make_optimizer, tasks)
    _assert_same_weights(wrapped, manual)
    _assert_same_weights(attached, manual)


@pytest.mark.parametrize("make_optimizer", OPTIMIZERS, ids=OPTIMIZER_IDS)
@pytest.mark.parametrize("native", ["1", "0"], ids=["native", "reference"])
def test_any_optimizer_with_the_update_mask_equals_scaling_the_change_by_hand(
    make_optimizer, native, monkeypatch
):
    """For all of these ``mask="auto"`` is the update mask; it equals stepping, then scaling
    each change by hand (to float rounding: torch's lerp forms it differently), through the native
    CPU kernel and through the reference (CPU bfloat16 or non-contiguous parameters, no C
    compiler)."""
    monkeypatch.setenv("SPG_FAST_NATIVE", native)
    tasks = make_tasks()
    manual, _, _ = _train("manual-update", make_optimizer, tasks)
    for mode in ("wrap", "attach"):
        trained, _, opt = _train(mode, make_optimizer, tasks)
        for (name, p), q in zip(trained.named_parameters(), manual.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
        if mode == "wrap":
            assert opt.mask_modes() == ["update"]


def test_wrapper_is_an_optimizer_sharing_the_inner_state():
    model = _fresh()
    spg = SPG(model, heads=model.heads)
    inner = torch.optim.Adam(model.parameters(), lr=0.01)
    opt = spg.wrap(inner)
    assert (
        isinstance(opt, torch.optim.Optimizer)
        and isinstance(opt, SPGOptimizer)
        and opt.optimizer is inner
    )
    assert (
        opt.param_groups is inner.param_groups
        and opt.state is inner.state
        and opt.defaults is inner.defaults
    )
    assert repr(opt).startswith("SPGOptimizer(Adam (")


def test_nothing_is_masked_before_the_first_task():
    model = _fresh()
    spg = SPG(model, heads=model.heads)
    x, y = make_tasks(n_tasks=1)[0][0]
    F.cross_entropy(model(x, 0), y).backward()
    used = [*model.trunk.parameters(), *model.heads[0].parameters()]
    before = [p.grad.clone() for p in used]
    spg.mask_gradients()
    assert all(torch.equal(p.grad, b) for p, b in zip(used, before, strict=True))


def test_mask_path_never_reads_tensors_on_the_host(monkeypatch):
    tasks = make_tasks()
    model, spg, _ = _train("wrap", lambda p: torch.optim.SGD(p, lr=0.1), tasks[:1])
    x, y = tasks[1][0]
    F.cross_entropy(model(x, 1), y).backward()

    def forbidden(*_args, **_kwargs):
        raise AssertionError("host read of a tensor value during masking")

    for attr in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy"):
        monkeypatch.setattr(torch.Tensor, attr, forbidden)
    spg.mask_gradients()


def test_lr_schedulers_drive_the_wrapped_optimizer():
    model = _fresh()
    spg = SPG(model, heads=model.heads)
    opt = spg.wrap(torch.optim.SGD(model.parameters(), lr=1.0))
    step_lr = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=1 / 3, patience=0, min_lr=1e-3)
    x, y = make_tasks(n_tasks=1)[0][0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for _ in range(4):
            opt.zero_grad()
            F.cross_entropy(model(x, 0), y).backward()
            opt.step()
            step_lr.step()
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(0.25)
    plateau.step(1.0)
    plateau.step(2.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.25 / 3)


def test_grad_scaler_skips_an_inf_step_and_otherwise_matches_manual_masking():
    tasks = make_tasks()

    def run(mode: str):
        model, spg, _ = _train("none", lambda p: torch.optim.SGD(p, lr=0.1), tasks[:1])
        inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        opt = spg.wrap(inner) if mode == "wrap" else inner
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        history = []
        for i, (x, y) in enumerate(tasks[1] * 2):
            opt.zero_grad()
            scaler.scale(F.cross_entropy(model(x, 1), y)).backward()
            if i == 2:
                model.trunk[0].weight.grad[0, 0] = float("inf")
            if mode == "manual":
                scaler.unscale_(opt)
                spg.mask_gradients()
            before = [p.detach().clone() for p in model.parameters()]
            scaler.step(opt)
            scaler.update()
            history.append(
                (
                    scaler.get_scale(),
                    all(torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True)),
                )
            )
        return model, history

    wrapped, history = run("wrap")
    manual, manual_history = run("manual")
    assert history == manual_history
    assert [unchanged for _, unchanged in history] == [False, False, True, False, False, False]
    assert history[2][0] == 2.0**7
    assert all(torch.isfinite(p).all() for p in wrapped.parameters())
    _assert_same_weights(wrapped, manual)


def test_state_dicts_interchange_with_the_inner_optimizer():
    tasks = make_tasks()
    model, _, opt = _train("wrap", lambda p: torch.optim.Adam(p, lr=0.01), tasks[:1])
    sd = opt.state_dict()
    assert (
        sd.keys() == {"state", "param_groups"} and 0 in sd["state"] and "exp_avg" in sd["state"][0]
    )
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    plain = torch.optim.Adam(model.parameters(), lr=0.01)
    buffer.seek(0)
    plain.load_state_dict(torch.load(buffer, weights_only=True))
    fresh = SPG(model, heads=model.heads).wrap(torch.optim.Adam(model.parameters(), lr=0.5))
    fresh.load_state_dict(plain.state_dict())
    assert (
        fresh.param_groups[0]["lr"] == 0.01 and fresh.param_groups is fresh.optimizer.param_groups
    )
    assert torch.equal(
        fresh.state[model.trunk[0].weight]["exp_avg"], opt.state[model.trunk[0].weight]["exp_avg"]
    )


def test_state_dict_hooks_reach_the_inner_optimizer():
    model = _fresh()
    opt = SPG(model, heads=model.heads).wrap(torch.optim.SGD(model.parameters(), lr=0.1))
    calls = []
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("save"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load"))
    opt.load_state_dict(opt.state_dict())
    assert calls == ["save", "load"]


def test_zero_grad():
    model = _fresh()
    opt = SPG(model, heads=model.heads).wrap(torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = make_tasks(n_tasks=1)[0][0]
    F.cross_entropy(model(x, 0), y).backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.trunk.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_add_param_group_for_a_head_added_later():
    torch.manual_seed(0)
    model = MultiHeadNet(n_tasks=1)
    spg = SPG(model, heads=model.heads)
    opt = spg.wrap(torch.optim.SGD(model.parameters(), lr=0.1))
    tasks = make_tasks(n_tasks=2)
    spg.end_task(0, tasks[0])
    model.heads.append(nn.Linear(12, 3))
    opt.add_param_group({"params": model.heads[1].parameters(), "lr": 0.2})
    assert len(opt.optimizer.param_groups) == 2 and opt.param_groups[1]["lr"] == 0.2
    x, y = tasks[1][0]
    F.cross_entropy(model(x, 1), y).backward()
    grad = model.heads[1].weight.grad.clone()
    before = model.heads[1].weight.detach().clone()
    opt.step()
    torch.testing.assert_close(model.heads[1].weight, before - 0.2 * grad * spg.head_scale)


def test_add_param_group_of_unknown_tensors_is_refused_and_changes_nothing():
    model = _fresh()
    opt = SPG(model, heads=model.heads).wrap(torch.optim.SGD(model.parameters(), lr=0.1))
    stranger = nn.Parameter(torch.zeros(4, 5))
    with pytest.raises(
        ValueError, match=r"not parameters of the SPG model \(tensor of shape \(4, 5\)\)"
    ):
        opt.add_param_group({"params": [stranger]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("how", ["wrap", "attach"])
def test_optimizer_with_unknown_parameters_is_refused(how):
    model = _fresh()
    spg = SPG(model, heads=model.heads)
    opt = torch.optim.SGD([*model.parameters(), nn.Parameter(torch.zeros(7))], lr=0.1)
    with pytest.raises(
        ValueError, match=rf"SPG.{how}\(SGD\): 1 optimized tensor\(s\) .*shape \(7,\)"
    ):
        getattr(spg, how)(opt)


def test_frozen_model_parameters_are_accepted():
    model = _fresh()
    model.trunk[0].bias.requires_grad_(False)
    spg = SPG(model, heads=model.heads)
    spg.wrap(torch.optim.SGD(model.parameters(), lr=0.1))


def test_masking_twice_is_refused():
    model = _fresh()
    spg = SPG(model, heads=model.heads)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped = spg.wrap(inner)
    with pytest.raises(RuntimeError, match="is already masked through an SPG object"):
        spg.attach(inner)
    with pytest.raises(RuntimeError, match="is already masked through an SPG object"):
        spg.wrap(inner)
    with pytest.raises(TypeError, match="already"):
        spg.attach(wrapped)
    with pytest.raises(TypeError, match="already an SPGOptimizer"):
        spg.wrap(wrapped)
    other = SPG(model, heads=model.heads)
    with pytest.raises(RuntimeError, match="SGD is already masked through an SPG object"):
        other.attach(inner)
    fused = optim.SGD(
        model.parameters(), lr=0.1, spg=other
    )  # a fused optimizer registers itself too
    with pytest.raises(RuntimeError, match="is already masked through an SPG object"):
        spg.attach(fused)


@pytest.mark.parametrize("how", ["wrap", "fused"])
def test_masked_optimizers_pickle_and_keep_masking(how):
    """As torch's optimizers do, a masking optimizer pickles (with its SPG object and model) and the
    copy trains exactly as the original, masking included."""
    tasks = make_tasks()
    model = _fresh()
    spg = SPG(model, heads=model.heads)
    spg.end_task(0, tasks[0])
    opt = (
        spg.wrap(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
        if how == "wrap"
        else optim.SGD(model.parameters(), lr=0.1, momentum=0.9, spg=spg)
    )
    copy_ = pickle.loads(pickle.dumps(opt))
    copy_model = copy_.param_groups[0]["params"][0]
    assert copy_model is not model.trunk[0].weight
    models = [model, (copy_._spg if how == "wrap" else copy_.spg).model]
    for m, o in zip(models, (opt, copy_), strict=True):
        for x, y in tasks[1]:
            o.zero_grad()
            F.cross_entropy(m(x, 1), y).backward()
            o.step()
    for a, b in zip(*(m.parameters() for m in models), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="is already masked through an SPG object"):
        (copy_._spg if how == "wrap" else copy_.spg).wrap(
            copy_ if how == "fused" else copy_.optimizer
        )


def test_step_hooks_run_around_the_masked_step():
    tasks = make_tasks()
    model, spg, opt = _train("wrap", lambda p: torch.optim.SGD(p, lr=0.1), tasks[:1])
    seen = []
    opt.register_step_pre_hook(
        lambda o, a, k: seen.append(("pre", o is opt, model.trunk[0].weight.grad.clone()))
    )
    opt.register_step_post_hook(lambda o, a, k: seen.append(("post", o is opt)))
    opt.optimizer.register_step_pre_hook(
        lambda o, a, k: seen.append(("inner", model.trunk[0].weight.grad.clone()))
    )
    x, y = tasks[1][0]
    F.cross_entropy(model(x, 1), y).backward()
    opt.step()
    assert [s[0] for s in seen] == ["pre", "inner", "post"] and seen[0][1] and seen[2][1]
    keep = spg.keep_factors["trunk.0.weight"]
    assert torch.equal(
        seen[1][1], seen[0][2] * keep
    )  # the wrapped optimizer sees the masked gradient


@pytest.mark.parametrize("mode", ["wrap", "attach"])
@pytest.mark.parametrize("kind", ["sgd", "lbfgs"])
def test_step_with_closure_masks_every_evaluation(mode, kind):
    """Gradient mask: the closure's gradients are masked after every evaluation (LBFGS evaluates
    several times per step)."""
    tasks = make_tasks()

    def run(masking: str):
        model, spg, _ = _train("none", lambda p: torch.optim.SGD(p, lr=0.1), tasks[:1])
        inner = (
            torch.optim.SGD(model.parameters(), lr=0.1)
            if kind == "sgd"
            else torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
        )
        opt = spg.wrap(inner, mask="gradient") if masking == "wrap" else inner
        if masking == "attach":
            spg.attach(inner, mask="gradient")
        x, y = tasks[1][0]

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x, 1), y)
            loss.backward()
            if masking == "manual":
                spg.mask_gradients()
            return loss

        for _ in range(3):
            loss = opt.step(closure=closure) if kind == "sgd" else opt.step(closure)
        assert loss is not None
        return model

    _assert_same_weights(run(mode), run("manual"))


def test_attach_handle_removes_the_masking():
    tasks = make_tasks()
    model, spg, opt = _train("none", lambda p: torch.optim.SGD(p, lr=0.1), tasks[:1])
    x, y = tasks[1][0]
    with spg.attach(opt):
        F.cross_entropy(model(x, 1), y).backward()
        grad = model.trunk[0].weight.grad.clone()
        opt.step()
        assert torch.equal(model.trunk[0].weight.grad, grad * spg.keep_factors["trunk.0.weight"])
    opt.zero_grad()
    F.cross_entropy(model(x, 1), y).backward()
    grad = model.trunk[0].weight.grad.clone()
    opt.step()
    assert torch.equal(model.trunk[0].weight.grad, grad)
    spg.attach(opt)  # allowed again once removed


def test_sparse_gradients_are_refused_by_name():
    model = nn.ModuleDict({"emb": nn.Embedding(5, 3, sparse=True), "head": nn.Linear(3, 2)})
    spg = SPG(model, heads="head")
    batches = [(torch.tensor([[1, 2]]), torch.tensor([1]))]

    def forward(x, head):
        return model["head"](model["emb"](x).mean(1))

    model["emb"].sparse = False
    spg.end_task(0, batches, forward)
    model["emb"].sparse = True
    F.cross_entropy(forward(batches[0][0], 0), batches[0][1]).backward()
    with pytest.raises(TypeError, match=r"'emb\.weight' has a sparse gradient"):
        spg.mask_gradients()


def test_update_masking_scales_the_step_a_plain_sgd_would_take():
    """mask="update": the change each step made is scaled as the gradient would be; for plain SGD
    both modes agree to rounding, and a parameter with importance 1 does not move even under AdamW's
    weight decay and moments."""
    tasks = make_tasks()
    runs = {}
    for mode in ("gradient", "update"):
        model = _fresh()
        spg = SPG(model, heads=model.heads)
        spg.end_task(0, tasks[0])
        opt = spg.wrap(torch.optim.SGD(model.parameters(), lr=0.1), mask=mode)
        for x, y in tasks[1]:
            opt.zero_grad()
            F.cross_entropy(model(x, 1), y).backward()
            opt.step()
        runs[mode] = model
    for a, b in zip(runs["gradient"].parameters(), runs["update"].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)

    model = _fresh()
    spg = SPG(model, heads=model.heads)
    spg.load_state_dict(
        {
            "format": 1,
            "tasks_finished": 1,
            "importance": {n: torch.ones_like(p) for n, p in spg.shared_parameters.items()},
        }
    )
    opt = spg.wrap(torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5), mask="update")
    frozen = [p.detach().clone() for p in model.trunk.parameters()]
    for x, y in tasks[1]:
        opt.zero_grad()
        F.cross_entropy(model(x, 1), y).backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.trunk.parameters(), frozen, strict=True))
    with pytest.raises(
        ValueError, match="mask='weights' is not one of 'auto', 'gradient', 'update'"
    ):
        spg.wrap(torch.optim.SGD(model.parameters(), lr=0.1), mask="weights")


def test_the_wrapper_forwards_what_the_inner_optimizer_adds():
    class WithExtras(torch.optim.SGD):
        def consolidate_state_dict(self, to: int = 0) -> str:
            return f"consolidated to {to}"

    model = _fresh()
    spg = SPG(model, heads=model.heads)
    opt = spg.wrap(WithExtras(model.parameters(), lr=0.1))
    assert opt.consolidate_state_dict(to=1) == "consolidated to 1"
    with pytest.raises(AttributeError):
        opt.no_such_method  # noqa: B018


@pytest.mark.parametrize("how", ["wrap", "spg_fast.optim fallback"])
def test_the_update_mask_around_torchs_step_allocates_its_snapshots_once(how, monkeypatch):
    """Update masking around a step that cannot scale its own change keeps one snapshot buffer per
    parameter: no ``empty_like`` after the first masked step."""
    monkeypatch.setenv("SPG_FAST_NATIVE", "0")  # spg_fast.optim on the CPU: torch's fused step
    tasks = make_tasks()
    model = _fresh()
    spg = SPG(model, heads=model.heads, backend="torch")
    spg.end_task(0, tasks[0])
    if how == "wrap":
        opt = spg.wrap(torch.optim.AdamW(model.parameters(), lr=1e-2), mask="update")
    else:
        opt = optim.AdamW(model.parameters(), lr=1e-2, spg=spg, mask="update")
    made = []
    empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda t, **kw: made.append(t) or empty_like(t, **kw))
    for step, (x, y) in enumerate(tasks[1] * 2):
        opt.zero_grad()
        F.cross_entropy(model(x, 1), y).backward()
        opt.step()
        if step == 0:
            first = len(made)
    moving = sum(1 for p in model.parameters() if p.grad is not None)
    assert first == moving and len(made) == first
