"""The masked SGD step kernels (Triton and native CPU), reading stored keep factors in every format,
against torch's fused SGD run in float64: on the masked gradient (gradient mode), or on the unmasked
gradient with the change then scaled (update mode)."""

from __future__ import annotations

import pytest
import torch

from spg_fast import reference
from tests.kernels.step_cases import IMPLS, MODES, assert_close, cases, copies64, problem

CONFIGS = [
    dict(lr=0.1, weight_decay=0.0, momentum=0.0, dampening=0.0, nesterov=False, maximize=False),
    dict(lr=0.05, weight_decay=0.01, momentum=0.9, dampening=0.2, nesterov=False, maximize=False),
    dict(lr=0.05, weight_decay=0.0, momentum=0.8, dampening=0.0, nesterov=True, maximize=True),
    # GradScaler's scale divided out, weight decay with nesterov momentum.
    dict(lr=0.05, weight_decay=0.1, momentum=0.9, dampening=0.0, nesterov=True, maximize=False),
]
GRAD_SCALED = 3


def _oracle(params, grads, bufs, first, hyper):
    p64, b64 = copies64(params), copies64(bufs)
    for is_first in (True, False):
        chosen = [i for i, f in enumerate(first) if f == is_first]
        if chosen:
            torch._fused_sgd_(
                [p64[i] for i in chosen],
                [grads[i] for i in chosen],
                [b64[i] for i in chosen] if bufs else [],
                is_first_step=is_first,
                **{**hyper, "lr": float(hyper["lr"])},
            )
    return p64, b64


@pytest.mark.parametrize("impl, dtype, keep_dtype, update, config", cases(len(CONFIGS)))
def test_matches_torch_in_float64(impl, dtype, keep_dtype, update, config):
    hyper = CONFIGS[config]
    grad_scale = 1024.0 if config == GRAD_SCALED else None
    case = problem(impl, dtype, 1, grad_scale, keep_dtype)
    momentum = hyper["momentum"] != 0
    bufs = [case.rand(s) for s in case.shapes] if momentum else []
    first = [momentum and i % 2 == 0 for i in range(len(case.shapes))]
    p_before, b_before = copies64(case.params), copies64(bufs)
    p64, b64 = _oracle(case.params, case.grads64(update), bufs, first, hyper)
    if update:
        case.masked_change(p_before, p64)
    grads = [g.clone() for g in case.grads]
    impl.ops("sgd_step").sgd_step_(
        case.params,
        case.grads,
        case.keeps,
        bufs,
        first,
        case.head_scale,
        update,
        case.grad_scale,
        None,
        **hyper,
    )
    assert_close(case.params, p64, p_before, dtype)
    assert_close(bufs, b64, b_before, dtype)
    assert all(torch.equal(g, b) for g, b in zip(case.grads, grads, strict=True))


@pytest.mark.parametrize("update", MODES.values(), ids=list(MODES))
@pytest.mark.parametrize("impl", IMPLS.values(), ids=list(IMPLS))
def test_a_tensor_lr_is_read_like_a_float(impl, update):
    hyper = CONFIGS[1]
    results = []
    for lr in (hyper["lr"], torch.tensor(hyper["lr"], dtype=torch.float64, device=impl.device)):
        case = problem(impl, torch.float32, 2, keep_dtype=torch.uint8)
        bufs = [case.rand(s) for s in case.shapes]
        impl.ops("sgd_step").sgd_step_(
            case.params,
            case.grads,
            case.keeps,
            bufs,
            [False] * len(case.shapes),
            case.head_scale,
            update,
            None,
            None,
            **{**hyper, "lr": lr},
        )
        results.append(case.params + bufs)
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


@pytest.mark.parametrize("update", MODES.values(), ids=list(MODES))
@pytest.mark.parametrize("impl", IMPLS.values(), ids=list(IMPLS))
def test_no_mask_before_the_first_task_and_grad_untouched(impl, update):
    """No keep factors and no head scale: torch's step, in either mode, with weight decay."""
    case = problem(impl, torch.float32, 3)
    hyper = dict(CONFIGS[0], weight_decay=0.1)
    p_before = copies64(case.params)
    expected, _ = _oracle(case.params, case.grads64(True), [], [False] * len(case.shapes), hyper)
    before = [g.clone() for g in case.grads]
    impl.ops("sgd_step").sgd_step_(
        case.params,
        case.grads,
        [],
        [],
        [False] * len(case.shapes),
        None,
        update,
        None,
        None,
        **hyper,
    )
    assert_close(case.params, expected, p_before, torch.float32)
    assert all(torch.equal(g, b) for g, b in zip(case.grads, before, strict=True))


@pytest.mark.parametrize("impl", IMPLS.values(), ids=list(IMPLS))
def test_update_mode_is_the_reference_update_mask_around_torchs_step(impl):
    """Update mode against the unfused path in float32: torch's fused SGD on the unmasked
    gradient, then ``reference.scale_updates_`` with the same stored keep factors."""
    hyper = CONFIGS[1]
    case = problem(impl, torch.float32, 4, keep_dtype=torch.bfloat16)
    bufs = [case.rand(s) for s in case.shapes]
    params, their_bufs = [p.cpu().clone() for p in case.params], [b.cpu().clone() for b in bufs]
    before, b_before = [p.clone() for p in params], [b.clone() for b in their_bufs]
    torch._fused_sgd_(
        params, [g.cpu() for g in case.grads], their_bufs, is_first_step=False, **hyper
    )
    n = len(case.keeps)
    reference.scale_updates_(
        params[:n],
        before[:n],
        [k.cpu() for k in case.keeps],
        params[n:],
        before[n:],
        case.head_scale.cpu(),
    )
    impl.ops("sgd_step").sgd_step_(
        case.params,
        case.grads,
        case.keeps,
        bufs,
        [False] * len(bufs),
        case.head_scale,
        True,
        None,
        None,
        **hyper,
    )
    assert_close(case.params, [p.double() for p in params], before, torch.float32)
    assert_close(bufs, [b.double() for b in their_bufs], b_before, torch.float32)
