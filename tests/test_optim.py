"""spg_fast.optim against torch's own optimizer with SPG's mask written around it ("mask the
gradient, then torch's step", or "torch's step, then scale the change"), on each of its step
paths."""

from __future__ import annotations

import copy
import inspect
import io

import pytest
import torch
import torch.nn.functional as F

from spg_fast import SPG, optim
from tests.helpers import MultiHeadNet, make_tasks

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Each way spg_fast.optim can step: SPG backend and SPG_FAST_NATIVE setting
# (spg_fast._backend.Ops.step_kernels).
PATHS = {"triton": ("triton", "auto"), "native": ("torch", "1"), "mask+torch": ("torch", "0")}
CONFIGS = {
    "sgd": (optim.SGD, torch.optim.SGD, dict(lr=0.05)),
    "sgd-momentum-wd": (
        optim.SGD,
        torch.optim.SGD,
        dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2),
    ),
    "sgd-nesterov-max": (
        optim.SGD,
        torch.optim.SGD,
        dict(lr=0.05, momentum=0.8, nesterov=True, maximize=True),
    ),
    "adam": (optim.Adam, torch.optim.Adam, dict(lr=1e-2)),
    "adam-amsgrad-wd-max": (
        optim.Adam,
        torch.optim.Adam,
        dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1, amsgrad=True, maximize=True),
    ),
    "adamw": (optim.AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.5)),
    "adamw-amsgrad": (optim.AdamW, torch.optim.AdamW, dict(lr=1e-2, amsgrad=True)),
    "adam-betas-zero": (
        optim.Adam,
        torch.optim.Adam,
        dict(lr=1e-3, betas=(0.0, 0.0)),
    ),  # log(0): no bias correction
}
# Steps per comparison: 6 for the Triton kernels, which run under the interpreter on the CPU at
# about 50 ms a step (a kernel bug shows in the first step), 50 for the others; the slow suite runs
# the Triton kernels 50 steps too (rounding differences must not compound).
STEPS = {"triton": 6}
LONG = 50
# Both run in float32 with different operation orders (one fused pass vs torch's op by op).
# Over 50 steps the largest difference measured was 4.8e-7 (Triton), 7.3e-7 (native CPU,
# FMA-contracted) and 2.8e-7 (mask + torch fused) absolute, parameters of size ~0.1-1: a few float32
# ulps that compound over the steps.
TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(params=list(PATHS))
def backend(request, monkeypatch):
    """The SPG backend of one step path, with the environment that selects it."""
    name, native = PATHS[request.param]
    monkeypatch.setenv("SPG_FAST_NATIVE", native)
    return name


def _setup(backend: str, dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    model = MultiHeadNet().to(DEVICE, dtype)
    spg = SPG(model, heads=model.heads, backend=backend)
    tasks = [[(x.to(DEVICE, dtype), y.to(DEVICE)) for x, y in batches] for batches in make_tasks()]
    return model, spg, tasks


def _loss_step(model, task, batch):
    x, y = batch
    F.cross_entropy(model(x, task).float(), y).backward()


def _steps(backend: str) -> int:
    return STEPS.get(backend, LONG)


@torch.no_grad()
def scale_the_change(spg: SPG, params, before) -> None:
    """The update mask written out: ``p = before + keep * (p - before)``, in float64."""
    names = {p: n for n, p in spg.model.named_parameters()}
    keeps = spg.keep_factors
    for p, b in zip(params, before, strict=True):
        keep = keeps[names[p]].double() if names[p] in keeps else spg.head_scale.double()
        p.copy_(b.double() + keep * (p.double() - b.double()))


def _run_pair(
    name: str,
    backend: str,
    dtype=torch.float32,
    steps: int | None = None,
    masked: bool = True,
    mask: str = "auto",
):
    """Our optimizer (with ``mask``) and torch's on a copy, with SPG's mask written around it in
    the mode ours resolved to, over ``steps`` steps."""
    ours_cls, torch_cls, kwargs = CONFIGS[name]
    model, spg, tasks = _setup(backend, dtype)
    if masked:
        spg.end_task(0, tasks[0])
    twin = copy.deepcopy(model)
    ours = ours_cls(model.parameters(), spg=spg, mask=mask, **kwargs)
    (mode,) = ours.mask_modes()
    theirs = torch_cls(twin.parameters(), **kwargs)
    twin_spg = SPG(twin, heads=twin.heads, backend="torch")
    twin_spg.load_state_dict(spg.state_dict())
    task = 1 if masked else 0
    for i in range(_steps(backend) if steps is None else steps):
        batch = tasks[task][i % len(tasks[task])]
        for m, opt in ((model, ours), (twin, theirs)):
            opt.zero_grad()
            _loss_step(m, task, batch)
        ours.step()
        if mode == "gradient":
            twin_spg.mask_gradients()
            theirs.step()
        else:
            params = [p for p in twin.parameters() if p.grad is not None]
            before = [p.detach().clone() for p in params]
            theirs.step()
            if masked:
                scale_the_change(twin_spg, params, before)
    return model, twin, ours, theirs


# Every config in its "auto" mode (the gradient mask for SGD without weight decay, the update mask
# for the others), and both kernels in the other mode too.
CASES = [*((name, "auto") for name in CONFIGS), ("sgd", "update"), ("adamw", "gradient")]


def _check_pair(name: str, backend: str, mask: str, steps: int | None = None) -> None:
    model, twin, ours, theirs = _run_pair(name, backend, mask=mask, steps=steps)
    for (pname, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, **TOL, msg=pname)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert ours.state[p].keys() == theirs.state[q].keys()
        for key, value in ours.state[p].items():
            torch.testing.assert_close(value.cpu(), theirs.state[q][key].cpu(), **TOL, msg=key)


@pytest.mark.parametrize("name, mask", CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_matches_torch_with_the_mask_written_out_over_many_steps(name, mask, backend):
    _check_pair(name, backend, mask)


@pytest.mark.slow
@pytest.mark.parametrize("name, mask", CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_the_triton_kernels_match_torch_over_as_many_steps_as_the_others(name, mask, monkeypatch):
    monkeypatch.setenv("SPG_FAST_NATIVE", PATHS["triton"][1])
    _check_pair(name, "triton", mask, steps=LONG)


@pytest.mark.parametrize("name", ["sgd-momentum-wd", "adamw"])
def test_before_the_first_task_nothing_is_masked(name, backend):
    model, twin, _, _ = _run_pair(name, backend, steps=10, masked=False)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("name", ["sgd-momentum-wd", "adam-amsgrad-wd-max"])
def test_bfloat16_parameters_on_the_kernels(name):
    # The gradient mask; the update mask on bfloat16 parameters is checked against a float64 oracle
    # in tests/kernels (torch's bfloat16 step rounds the change it makes to the parameter's ulp
    # before any scaling, so it is no oracle for a step that scales it in float32).
    model, twin, _, _ = _run_pair(name, "triton", dtype=torch.bfloat16, steps=10, mask="gradient")
    # torch rounds to bfloat16 after every operation, the kernel once per step; after 10 steps the
    # largest difference measured was 2.0e-3, half a bfloat16 ulp at 1. Allowed: one
    # ulp (2**-8 absolute, 2**-7 relative).
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=2.0**-7, atol=2.0**-8)


def test_gradients_after_the_step(backend):
    """The Triton and native kernels read the mask inside the update and leave .grad alone; the
    mask + torch path masks .grad in place (the spec's grad <- grad * (1 - A)) before torch's
    fused kernel."""
    model, spg, tasks = _setup(backend)
    spg.end_task(0, tasks[0])
    opt = optim.SGD(model.parameters(), lr=0.1, spg=spg)
    _loss_step(model, 1, tasks[1][0])
    grads = [p.grad.clone() for p in model.trunk.parameters()]
    opt.step()
    keeps = [spg.keep_factors[n] for n, _ in model.trunk.named_parameters(prefix="trunk")]
    # e.g. the native steps on CUDA tensors
    in_place = spg._ops.step_kernels(list(model.parameters()), keeps) is None
    for p, g, keep in zip(model.trunk.parameters(), grads, keeps, strict=True):
        assert torch.equal(p.grad, g * keep if in_place else g)


@pytest.mark.parametrize("name", ["sgd-momentum-wd", "adam-amsgrad-wd-max"])
def test_state_dict_round_trips_through_torch_mid_run(name, backend):
    ours_cls, torch_cls, kwargs = CONFIGS[name]
    model, spg, tasks = _setup(backend)
    spg.end_task(0, tasks[0])
    ours = ours_cls(model.parameters(), spg=spg, **kwargs)

    def steps(m, opt, first, count):
        for i in range(first, first + count):
            opt.zero_grad()
            _loss_step(m, 1, tasks[1][i % 3])
            opt.step()

    half = _steps(backend) // 2
    steps(model, ours, 0, half)
    buffer = io.BytesIO()
    torch.save(ours.state_dict(), buffer)
    buffer.seek(0)
    twin = copy.deepcopy(model)
    theirs = torch_cls(twin.parameters(), **kwargs)
    theirs.load_state_dict(torch.load(buffer, weights_only=True))
    twin_spg = SPG(twin, heads=twin.heads, backend=backend)
    twin_spg.load_state_dict(spg.state_dict())
    resumed = ours_cls(twin.parameters(), spg=twin_spg, **kwargs)
    resumed.load_state_dict(theirs.state_dict())
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        for key, value in ours.state[p].items():
            assert (
                torch.equal(resumed.state[q][key], value)
                and resumed.state[q][key].device == value.device
            ), key
    steps(model, ours, half, half)
    steps(twin, resumed, half, half)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


def test_grad_scaler_inf_step_is_skipped_and_others_match(backend):
    model, spg, tasks = _setup(backend)
    spg.end_task(0, tasks[0])
    twin = copy.deepcopy(model)
    twin_spg = SPG(twin, heads=twin.heads, backend="torch")
    twin_spg.load_state_dict(spg.state_dict())
    ours = optim.AdamW(model.parameters(), lr=1e-2, spg=spg)
    theirs = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    assert ours._step_supports_amp_scaling
    scalers = [torch.amp.GradScaler(DEVICE.type, init_scale=2.0**10) for _ in range(2)]
    for i in range(6):
        for m, opt, scaler in ((model, ours, scalers[0]), (twin, theirs, scalers[1])):
            opt.zero_grad()
            x, y = tasks[1][i % 3]
            scaler.scale(F.cross_entropy(m(x, 1), y)).backward()
            if i == 2:
                m.trunk[0].weight.grad[0, 0] = float("inf")
            before = [p.detach().clone() for p in m.parameters()]
            if opt is theirs:  # AdamW's "auto" mask is the update mask
                scaler.step(opt)
                moved = [p for p in m.parameters() if p.grad is not None]
                scale_the_change(
                    twin_spg,
                    moved,
                    [b for b, p in zip(before, m.parameters(), strict=True) if p.grad is not None],
                )
            else:
                scaler.step(opt)
            scaler.update()
            unchanged = all(torch.equal(b, p) for b, p in zip(before, m.parameters(), strict=True))
            assert unchanged == (i == 2)
    assert scalers[0].get_scale() == scalers[1].get_scale() == 2.0**9
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, **TOL)
    assert ours.state[model.trunk[0].weight]["step"].item() == 5


def test_hyperparameters_are_runtime_kernel_arguments():
    from spg_fast.kernels.triton import adam_step, sgd_step

    runtime = {
        sgd_step._sgd_step: ("lr", "weight_decay", "momentum", "undamped"),
        adam_step._adam_step: (
            "lr_hi",
            "lr_lo",
            "weight_decay",
            "decay",
            "lr_wd",
            "one_minus_beta1",
            "beta2",
            "one_minus_beta2",
            "eps",
        ),
    }
    for kernel, names in runtime.items():
        params = inspect.signature(kernel.fn).parameters
        for name in names:
            assert params[name].annotation is inspect.Parameter.empty, (
                f"{name} would recompile when changed"
            )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=-1.0), "Invalid learning rate: -1.0"),
        (dict(lr=0.1, momentum=-0.5), "Invalid momentum value"),
        (dict(lr=0.1, nesterov=True), "Nesterov momentum requires"),
        (dict(lr=torch.tensor([0.1, 0.2])), "Tensor lr must be 1-element"),
        (dict(lr=0.1, momentum=torch.tensor(0.9)), "momentum as a Tensor is not supported"),
        (dict(lr=0.1, weight_decay=torch.tensor(0.1)), "weight_decay as a Tensor is not supported"),
        (dict(lr=0.1, fused=True, foreach=True), "`fused` and `foreach` cannot be `True` together"),
        (dict(lr=0.1, foreach=True), "foreach=True and fused=False are not supported"),
        (dict(lr=0.1, fused=False), "foreach=True and fused=False are not supported"),
        (dict(lr=0.1, differentiable=True), "differentiable=True is not supported"),
    ],
)
def test_bad_hyperparameters_are_named(kwargs, message):
    model, spg, _ = _setup("torch")
    with pytest.raises((ValueError, TypeError, RuntimeError), match=message):
        optim.SGD(model.parameters(), spg=spg, **kwargs)


def test_adam_betas_are_checked():
    model, spg, _ = _setup("torch")
    with pytest.raises(ValueError, match=r"Invalid beta parameter at index 1: 1\.0"):
        optim.Adam(model.parameters(), betas=(0.9, 1.0), spg=spg)


def test_fused_optimizer_cannot_also_be_wrapped():
    model, spg, _ = _setup("torch")
    opt = optim.SGD(model.parameters(), lr=0.1, spg=spg)
    with pytest.raises(RuntimeError, match="is already masked through an SPG object"):
        spg.wrap(opt)


# Compiling the Triton path's step takes about 5 s under the interpreter: the slow suite runs it.
@pytest.mark.parametrize(
    "backend",
    ["native", "mask+torch", pytest.param("triton", marks=pytest.mark.slow)],
    indirect=True,
)
def test_a_tensor_lr_follows_its_scheduler_without_recompiling(backend):
    """With ``lr`` a tensor, a compiled step reads it as data: a scheduler changing it in place (as
    torch's schedulers do for tensor values) costs no recompilation, and the steps equal eager steps
    with a float lr."""
    from torch._dynamo.testing import CompileCounter

    model, spg, tasks = _setup(backend)
    spg.end_task(0, tasks[0])
    twin = copy.deepcopy(model)
    twin_spg = SPG(twin, heads=twin.heads, backend=backend)
    twin_spg.load_state_dict(spg.state_dict())
    ours = optim.SGD(
        model.parameters(), lr=torch.tensor(0.05, device=DEVICE), momentum=0.9, spg=spg
    )
    eager = optim.SGD(twin.parameters(), lr=0.05, momentum=0.9, spg=twin_spg)
    schedulers = [torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5) for opt in (ours, eager)]
    counter = CompileCounter()
    compiled_step = torch.compile(ours.step, backend=counter)
    frames = []
    for i in range(6):
        for m, opt in ((model, ours), (twin, eager)):
            opt.zero_grad()
            _loss_step(m, 1, tasks[1][i % 3])
        compiled_step()
        eager.step()
        for scheduler in schedulers:
            scheduler.step()
        frames.append(counter.frame_count)
    assert isinstance(ours.param_groups[0]["lr"], torch.Tensor)
    assert frames[1] == frames[-1], (
        f"recompiled as the lr changed: frames compiled after each step {frames}"
    )
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, **TOL)


class _Sub(torch.Tensor):
    """A tensor subclass, as FSDP2's DTensor is one."""


def test_tensor_subclass_parameters_are_refused():
    model, spg, _ = _setup("torch")
    subclassed = [torch.Tensor._make_subclass(_Sub, p.detach(), True) for p in model.parameters()]
    with pytest.raises(
        TypeError, match=r"SGD.add_param_group: a parameter of shape \(12, 6\) is a _Sub"
    ):
        optim.SGD(subclassed, lr=0.1, spg=spg)


# A setting that changes which state tensors a step uses, switched on between steps: ours builds a
# new plan. Torch's SGD creates the momentum buffer then; torch's Adam raises a KeyError for a
# state without max_exp_avg_sq, so its twin gets that state as zeros (what ours creates).
SWITCHED = {"sgd": ("momentum", 0.9), "adam": ("amsgrad", True)}


@pytest.mark.parametrize("name", list(SWITCHED))
def test_a_setting_switched_on_between_steps_is_honoured(name, backend):
    ours_cls, torch_cls, kwargs = CONFIGS[name]
    model, spg, tasks = _setup(backend)
    spg.end_task(0, tasks[0])
    twin = copy.deepcopy(model)
    ours = ours_cls(model.parameters(), spg=spg, mask="update", **kwargs)
    theirs = torch_cls(twin.parameters(), **kwargs)
    twin_spg = SPG(twin, heads=twin.heads, backend="torch")
    twin_spg.load_state_dict(spg.state_dict())
    setting, value = SWITCHED[name]
    for i in range(4):
        if i == 2:
            builds = ours.plan_builds
            for opt in (ours, theirs):
                opt.param_groups[0][setting] = value
            for state in theirs.state.values():
                if name == "adam":
                    state["max_exp_avg_sq"] = torch.zeros_like(state["exp_avg_sq"])
        batch = tasks[1][i % len(tasks[1])]
        for m, opt in ((model, ours), (twin, theirs)):
            opt.zero_grad()
            _loss_step(m, 1, batch)
        ours.step()
        params = [p for p in twin.parameters() if p.grad is not None]
        before = [p.detach().clone() for p in params]
        theirs.step()
        scale_the_change(twin_spg, params, before)
    assert ours.plan_builds == builds + 1
    for (pname, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, **TOL, msg=pname)


@pytest.mark.parametrize("name", ["sgd-momentum-wd", "adamw"])
def test_named_parameters_step_as_the_plain_ones_and_their_state_loads_into_torch(name, backend):
    ours_cls, torch_cls, kwargs = CONFIGS[name]
    model, spg, tasks = _setup(backend)
    spg.end_task(0, tasks[0])
    twin = copy.deepcopy(model)
    twin_spg = SPG(twin, heads=twin.heads, backend=backend)
    twin_spg.load_state_dict(spg.state_dict())
    heads = [(n, p) for n, p in model.named_parameters() if n.startswith("heads")]
    trunk = [(n, p) for n, p in model.named_parameters() if not n.startswith("heads")]
    named = ours_cls([{"params": trunk}, {"params": heads, "lr": 1e-3}], spg=spg, **kwargs)
    twin_heads = [p for n, p in twin.named_parameters() if n.startswith("heads")]
    twin_trunk = [p for n, p in twin.named_parameters() if not n.startswith("heads")]
    plain = ours_cls(
        [{"params": twin_trunk}, {"params": twin_heads, "lr": 1e-3}], spg=twin_spg, **kwargs
    )
    for batch in tasks[1][:3]:
        for m, opt in ((model, named), (twin, plain)):
            opt.zero_grad()
            _loss_step(m, 1, batch)
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)
    state = named.state_dict()
    assert state["param_groups"][1]["param_names"] == [n for n, _ in heads]
    theirs = torch_cls(
        [{"params": list(copy.deepcopy(model).named_parameters())[: len(trunk)]},
         {"params": list(copy.deepcopy(model).named_parameters())[len(trunk):], "lr": 1e-3}],
        **kwargs,
    )  # fmt: skip
    theirs.load_state_dict(state)
    assert theirs.state_dict()["param_groups"][1]["param_names"] == [n for n, _ in heads]
