"""The masked Adam/AdamW step kernels (Triton and native CPU), reading stored keep factors in every
format, against torch's fused Adam/AdamW run in float64: on the masked gradient (gradient mode), or
on the unmasked gradient with the change then scaled (update mode)."""

from __future__ import annotations

import pytest
import torch

from spg_fast import reference
from tests.kernels.step_cases import (
    IMPLS,
    MODES,
    N_SHARED,
    assert_close,
    cases,
    copies64,
    problem,
)

CONFIGS = [
    dict(
        lr=1e-2,
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        decoupled=False,
        amsgrad=False,
        maximize=False,
    ),
    dict(
        lr=1e-2,
        beta1=0.8,
        beta2=0.99,
        eps=1e-6,
        weight_decay=0.1,
        decoupled=False,
        amsgrad=True,
        maximize=True,
    ),
    dict(
        lr=1e-2,
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
        weight_decay=0.5,
        decoupled=True,
        amsgrad=False,
        maximize=False,
    ),
    # GradScaler's scale divided out; AdamW with amsgrad.
    dict(
        lr=1e-2,
        beta1=0.9,
        beta2=0.99,
        eps=1e-8,
        weight_decay=0.1,
        decoupled=True,
        amsgrad=True,
        maximize=False,
    ),
]
GRAD_SCALED = 3
# beta2 = 0 (and beta1 = 0): v = g * g, so a tiny masked gradient underflows float32 whatever the
# implementation; checked against "mask .grad, then torch's float32 fused Adam" (gradient mode) and
# "torch's float32 fused Adam, then reference.scale_updates_" (update mode) instead of the float64
# oracle.
BETAS_ZERO = dict(
    lr=1e-3, beta1=0.0, beta2=0.0, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False
)


def _state(case, amsgrad):
    exp_avgs = [case.rand(s, scale=0.1) for s in case.shapes]
    exp_avg_sqs = [case.rand(s, positive=True, scale=0.01) for s in case.shapes]
    maxes = [
        v + case.rand(s, positive=True, scale=0.01)
        for v, s in zip(exp_avg_sqs, case.shapes, strict=True)
    ]
    steps = [
        torch.tensor(float(1 + 3 * i), device=case.impl.device) for i in range(len(case.shapes))
    ]
    return exp_avgs, exp_avg_sqs, maxes if amsgrad else [], steps


@pytest.mark.parametrize("impl, dtype, keep_dtype, update, config", cases(len(CONFIGS)))
def test_matches_torch_in_float64(impl, dtype, keep_dtype, update, config):
    hyper = dict(CONFIGS[config])
    grad_scale = 1024.0 if config == GRAD_SCALED else None
    case = problem(impl, dtype, 2, grad_scale, keep_dtype)
    exp_avgs, exp_avg_sqs, maxes, steps = _state(case, hyper["amsgrad"])
    copies = [copies64(ts) for ts in (case.params, exp_avgs, exp_avg_sqs, maxes)]
    befores = [copies64(ts) for ts in (case.params, exp_avgs, exp_avg_sqs, maxes)]
    # torch's fused Adam takes the counts already advanced
    steps64 = [s.double().cpu() + 1 for s in steps]
    impl.ops("adam_step").adam_step_(
        case.params,
        case.grads,
        case.keeps,
        exp_avgs,
        exp_avg_sqs,
        maxes,
        steps,
        case.head_scale,
        update,
        case.grad_scale,
        None,
        **hyper,
    )
    fused = torch._fused_adamw_ if hyper.pop("decoupled") else torch._fused_adam_
    fused(copies[0], case.grads64(update), copies[1], copies[2], copies[3], steps64, **hyper)
    if update:
        case.masked_change(befores[0], copies[0])
    assert [s.item() for s in steps] == [s.item() for s in steps64], (
        "the step counts are advanced by one"
    )
    for ours, oracle, before in zip(
        (case.params, exp_avgs, exp_avg_sqs, maxes), copies, befores, strict=True
    ):
        assert_close(ours, oracle, before, dtype)


@pytest.mark.parametrize("update", MODES.values(), ids=list(MODES))
@pytest.mark.parametrize("impl", IMPLS.values(), ids=list(IMPLS))
def test_a_tensor_lr_is_read_like_a_float(impl, update):
    hyper = CONFIGS[2]
    results = []
    for lr in (hyper["lr"], torch.tensor(hyper["lr"], dtype=torch.float64, device=impl.device)):
        case = problem(impl, torch.float32, 4, keep_dtype=torch.uint8)
        exp_avgs, exp_avg_sqs, _, steps = _state(case, False)
        impl.ops("adam_step").adam_step_(
            case.params,
            case.grads,
            case.keeps,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            case.head_scale,
            update,
            None,
            None,
            **{**hyper, "lr": lr},
        )
        results.append(case.params + exp_avgs + exp_avg_sqs)
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


@pytest.mark.parametrize("impl", IMPLS.values(), ids=list(IMPLS))
def test_found_inf_skips_every_tensor(impl):
    case = problem(impl, torch.float32, 5)
    exp_avgs, exp_avg_sqs, _, steps = _state(case, False)
    before = [t.clone() for t in case.params + exp_avgs + exp_avg_sqs + steps]
    impl.ops("adam_step").adam_step_(
        case.params,
        case.grads,
        case.keeps,
        exp_avgs,
        exp_avg_sqs,
        [],
        steps,
        case.head_scale,
        True,
        None,
        torch.ones((), device=impl.device),
        **CONFIGS[2],
    )
    assert all(
        torch.equal(a, b)
        for a, b in zip(case.params + exp_avgs + exp_avg_sqs + steps, before, strict=True)
    )


@pytest.mark.parametrize("update", MODES.values(), ids=list(MODES))
@pytest.mark.parametrize("impl", IMPLS.values(), ids=list(IMPLS))
def test_betas_zero_match_torch_in_float32(impl, update):
    """Against the unfused path in float32, with the reference's own mask: ``soft_mask_`` before
    torch's fused Adam (gradient mode) or ``scale_updates_`` after it (update mode)."""
    case = problem(impl, torch.float32, 6, keep_dtype=torch.bfloat16)
    exp_avgs, exp_avg_sqs, _, steps = _state(case, False)
    copies = [[t.cpu().clone() for t in ts] for ts in (case.params, exp_avgs, exp_avg_sqs)]
    befores = [[t.clone() for t in ts] for ts in copies]
    before = befores[0]
    grads32 = [g.cpu().clone() for g in case.grads]
    keeps, scale = [k.cpu() for k in case.keeps], case.head_scale.cpu()
    if not update:
        reference.soft_mask_(grads32[:N_SHARED], keeps, grads32[N_SHARED:], scale)
    torch._fused_adam_(
        copies[0], grads32, copies[1], copies[2], [], [s.cpu() + 1 for s in steps], **BETAS_ZERO
    )
    if update:
        params = copies[0]
        reference.scale_updates_(
            params[:N_SHARED], before[:N_SHARED], keeps, params[N_SHARED:], before[N_SHARED:], scale
        )
    impl.ops("adam_step").adam_step_(
        case.params,
        case.grads,
        case.keeps,
        exp_avgs,
        exp_avg_sqs,
        [],
        steps,
        case.head_scale,
        update,
        None,
        None,
        decoupled=False,
        **BETAS_ZERO,
    )
    for ours, theirs, old in zip(
        (case.params, exp_avgs, exp_avg_sqs), copies, befores, strict=True
    ):
        assert_close(ours, [t.double() for t in theirs], old, torch.float32)
