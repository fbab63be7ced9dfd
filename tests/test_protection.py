"""SPG protects through every entry point under AdamW, the optimizer most people train with: after a
task, the elements it relies on most move about ``1 - A`` as far as they would unprotected; and
under plain SGD the default is the paper's gradient mask, bit for bit.

The measure: one step from the same weights with and without SPG changes each shared element by
``keep`` times its unprotected change (the update mask), and over a task's training the elements
with ``A > 0.9`` move a small fraction as far as those with ``A < 0.1`` (about 0.05x; unprotected,
about 1x).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from spg_fast import SPG, optim
from spg_fast.harness import run
from tests.helpers import MultiHeadNet, make_tasks

Make = Callable[[MultiHeadNet, SPG], torch.optim.Optimizer]
ADAMW = dict(lr=1e-2, weight_decay=0.01)


def _attached(model: MultiHeadNet, spg: SPG) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW(model.parameters(), **ADAMW)
    spg.attach(opt)
    return opt


# Entry point -> (SPG backend, SPG_FAST_NATIVE, how the optimizer is made).
ENTRY_POINTS: dict[str, tuple[str, str, Make]] = {
    "wrap": ("torch", "auto", lambda m, s: s.wrap(torch.optim.AdamW(m.parameters(), **ADAMW))),
    "attach": ("torch", "auto", _attached),
    "fused-native": ("torch", "1", lambda m, s: optim.AdamW(m.parameters(), spg=s, **ADAMW)),
    "fused-mask+torch": ("torch", "0", lambda m, s: optim.AdamW(m.parameters(), spg=s, **ADAMW)),
    "fused-triton": ("triton", "auto", lambda m, s: optim.AdamW(m.parameters(), spg=s, **ADAMW)),
}


def _after_task0(backend: str) -> tuple[MultiHeadNet, SPG, list]:
    torch.manual_seed(0)
    model = MultiHeadNet(hidden=24)
    spg = SPG(model, heads=model.heads, backend=backend)
    tasks = make_tasks(n_batches=4, batch=16)
    plain = torch.optim.SGD(model.parameters(), lr=0.2)
    for _ in range(10):
        for x, y in tasks[0]:
            plain.zero_grad()
            F.cross_entropy(model(x, 0), y).backward()
            plain.step()
    spg.end_task(0, tasks[0])
    return model, spg, tasks


def _train(model: MultiHeadNet, opt: torch.optim.Optimizer, batches: list, steps: int) -> None:
    for i in range(steps):
        x, y = batches[i % len(batches)]
        opt.zero_grad()
        F.cross_entropy(model(x, 1), y).backward()
        opt.step()


# The Triton kernels run under the interpreter here: slow, and their parity is tested elsewhere.
ENTRY_CASES = [
    pytest.param(e, marks=(pytest.mark.slow,) if e == "fused-triton" else ()) for e in ENTRY_POINTS
]


@pytest.mark.parametrize("entry", ENTRY_CASES)
def test_adamw_moves_important_elements_about_keep_as_far(entry, monkeypatch):
    backend, native, make = ENTRY_POINTS[entry]
    monkeypatch.setenv("SPG_FAST_NATIVE", native)
    model, spg, tasks = _after_task0(backend)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    free = copy.deepcopy(model)
    free_opt = torch.optim.AdamW(free.parameters(), **ADAMW)

    # One step from the same weights: the protected change is keep times the unprotected one.
    opt = make(model, spg)
    _train(model, opt, tasks[1], 1)
    _train(free, free_opt, tasks[1], 1)
    free_params = dict(free.named_parameters())
    for name, keep in spg.keep_factors.items():
        moved = dict(model.named_parameters())[name].detach() - start[name]
        unprotected = free_params[name].detach() - start[name]
        torch.testing.assert_close(moved, keep * unprotected, rtol=1e-4, atol=1e-7, msg=name)

    # Over the task: elements task 0 relies on most move a small fraction as far as free ones.
    _train(model, opt, tasks[1], 23)
    importance = spg.importance
    high = torch.cat([importance[n].flatten() > 0.9 for n in importance])
    low = torch.cat([importance[n].flatten() < 0.1 for n in importance])
    moved = torch.cat(
        [
            (dict(model.named_parameters())[n].detach() - start[n]).abs().flatten()
            for n in importance
        ]
    )
    assert int(high.sum()) >= 20 and int(low.sum()) >= 20
    ratio = float(moved[high].mean() / moved[low].mean())
    assert ratio < 0.15, f"important elements moved {ratio:.2f}x as far as unimportant ones"


@pytest.mark.parametrize("how", ["wrap", "fused"])
def test_auto_under_plain_sgd_is_the_gradient_mask_bit_for_bit(how):
    """SGD without weight decay: ``mask="auto"`` is the paper's gradient mask, the same bits."""
    trained = []
    for mask in ("auto", "gradient"):
        model, spg, tasks = _after_task0("torch")
        if how == "wrap":
            opt = spg.wrap(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), mask=mask)
        else:
            opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9, spg=spg, mask=mask)
        assert opt.mask_modes() == ["gradient"]
        _train(model, opt, tasks[1], 8)
        trained.append(model)
    for a, b in zip(*(m.parameters() for m in trained), strict=True):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_the_harness_with_adamw_forgets_clearly_less_than_fine_tuning():
    settings = dict(optimizer="adamw", max_epochs=10)
    forgetting = {
        method: run("digits-permuted", method, tasks=4, config=settings, progress="none")[
            "forgetting"
        ]
        for method in ("spg", "finetune")
    }
    assert forgetting["spg"] < 0.5 * forgetting["finetune"], forgetting
