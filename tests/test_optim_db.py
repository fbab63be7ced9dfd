"""``spg_fast.optim`` on PyTorch's own optimizer test inputs (``optim_db`` in
``torch.testing._internal.common_optimizers``) for SGD, Adam and AdamW: each input, in each of
torch's implementation variants, in float32 and float64, before and after the first task.

Every input torch accepts is either stepped as torch steps it (before ``end_task``; after it, as
torch steps with SPG's mask written around its step in the mode ``mask="auto"`` picks) or refused by
name where spg-fast gives the option another meaning (``foreach=True``, ``differentiable=True``).
Every input torch refuses is refused with torch's error type and message.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from spg_fast import SPG, optim
from tests.helpers import MultiHeadNet, make_tasks
from tests.test_optim import scale_the_change

common_optimizers = pytest.importorskip("torch.testing._internal.common_optimizers")

OURS = {"SGD": optim.SGD, "Adam": optim.Adam, "AdamW": optim.AdamW}
INFOS = {
    i.optim_cls.__name__: i for i in common_optimizers.optim_db if i.optim_cls.__name__ in OURS
}
# torch's implementation variants, as its own optimizer tests run every input.
VARIANTS = {
    "default": {},
    "foreach": {"foreach": True},
    "for-loop": {"foreach": False},
    "fused": {"fused": True},
    "differentiable": {"differentiable": True},
}
REFUSED = {"foreach": "foreach=True and fused=False", "differentiable": "differentiable=True"}
DTYPES = [torch.float32, torch.float64]
STEPS = 3
# One float rounding per operation, in another order (one fused pass against torch's kernels),
# over 3 steps; measured at most 3e-7 (float32) and 4e-16 (float64).
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-13)}


def _inputs() -> list:
    cases = []
    for name, info in INFOS.items():
        for dtype in DTYPES:
            for optim_input in info.optim_inputs_func(device="cpu", dtype=dtype):
                for variant in VARIANTS:
                    for masked in (False, True):
                        label = f"{name}-{optim_input.desc}-{variant}-{str(dtype)[6:]}"
                        label += "-masked" if masked else ""
                        # The default variant in float32 in the fast suite, the rest in the slow.
                        fast = variant == "default" and dtype == torch.float32
                        marks = () if fast else (pytest.mark.slow,)
                        args = (name, optim_input.kwargs, variant, dtype, masked)
                        cases.append(pytest.param(*args, id=label, marks=marks))
    return cases


def _setup(dtype: torch.dtype, masked: bool):
    torch.manual_seed(0)
    model = MultiHeadNet().to(dtype)
    spg = SPG(model, heads=model.heads, backend="torch")
    tasks = [[(x.to(dtype), y) for x, y in batches] for batches in make_tasks()]
    if masked:
        spg.end_task(0, tasks[0])
    return model, spg, tasks[1 if masked else 0]


@pytest.mark.parametrize("name, kwargs, variant, dtype, masked", _inputs())
def test_torch_inputs_step_as_torch_or_are_refused_by_name(name, kwargs, variant, dtype, masked):
    kwargs = {**kwargs, **VARIANTS[variant]}
    model, spg, batches = _setup(dtype, masked)
    twin = copy.deepcopy(model)
    twin_spg = SPG(twin, heads=twin.heads, backend="torch")
    twin_spg.load_state_dict(spg.state_dict())
    theirs = INFOS[name].optim_cls(twin.parameters(), **copy.deepcopy(kwargs))
    if variant in REFUSED:
        with pytest.raises(ValueError, match=REFUSED[variant]):
            OURS[name](model.parameters(), spg=spg, **kwargs)
        return
    ours = OURS[name](model.parameters(), spg=spg, **kwargs)
    (mode,) = ours.mask_modes()
    task = 1 if masked else 0
    for i in range(STEPS):
        x, y = batches[i % len(batches)]
        for m, opt in ((model, ours), (twin, theirs)):
            opt.zero_grad()
            F.cross_entropy(m(x, task), y).backward()
        ours.step()
        if masked and mode == "gradient":
            twin_spg.mask_gradients()
        moved = [p for p in twin.parameters() if p.grad is not None]
        before = [p.detach().clone() for p in moved]
        theirs.step()
        if masked and mode == "update":
            scale_the_change(twin_spg, moved, before)
    for (pname, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, **TOL[dtype], msg=pname)


def _error_inputs() -> list:
    cases = []
    for name, info in INFOS.items():
        for error in info.optim_error_inputs_func(device="cpu", dtype=torch.float32):
            if error.error_on != common_optimizers.OptimizerErrorEnum.CONSTRUCTION_ERROR:
                continue
            cases.append(pytest.param(name, error, id=f"{name}-{error.optimizer_error_input.desc}"))
    return cases


@pytest.mark.parametrize("name, error", _error_inputs())
def test_what_torch_refuses_is_refused_with_torchs_error(name, error):
    model, spg, _ = _setup(torch.float32, masked=False)
    given = error.optimizer_error_input
    params = model.parameters() if given.params is None else given.params
    if issubclass(error.error_type, Warning):
        # The warning's parameters are not the SPG model's, which spg-fast refuses after it.
        warned = pytest.warns(error.error_type, match=error.error_regex)
        with warned, pytest.raises(ValueError, match="SPG model"):
            OURS[name](params, spg=spg, **given.kwargs)
        return
    with pytest.raises(error.error_type, match=error.error_regex):
        OURS[name](params, spg=spg, **given.kwargs)
