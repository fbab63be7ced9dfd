"""The masked Adam/AdamW step kernels (Triton and native CPU) against torch's fused Adam/AdamW run
in float64 on the masked gradient."""

from __future__ import annotations

import pytest
import torch

from spg_fast import reference
from tests.kernels.step_cases import CASES, IMPLS, N_SHARED, assert_close, problem

CONFIGS = {
    "adam": dict(
        lr=1e-2,
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        decoupled=False,
        amsgrad=False,
        maximize=False,
    ),
    "adam-wd-amsgrad-maximize": dict(
        lr=1e-2,
        beta1=0.8,
        beta2=0.99,
        eps=1e-6,
        weight_decay=0.1,
        decoupled=False,
        amsgrad=True,
        maximize=True,
    ),
    "adamw": dict(
        lr=1e-2,
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
        weight_decay=0.5,
        decoupled=True,
        amsgrad=False,
        maximize=False,
    ),
}
# beta2 = 0 (and beta1 = 0): v = g * g, so a tiny masked gradient underflows float32 whatever the
# implementation; checked against "mask .grad, then torch's float32 fused Adam" instead of the
# float64 oracle.
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


@pytest.mark.parametrize("impl, dtype", CASES)
@pytest.mark.parametrize(
    "config, grad_scale", [*((c, None) for c in CONFIGS), ("adam-wd-amsgrad-maximize", 1024.0)]
)
def test_matches_torch_in_float64(impl, dtype, config, grad_scale):
    hyper = dict(CONFIGS[config])
    case = problem(impl, dtype, 2, grad_scale)
    exp_avgs, exp_avg_sqs, maxes, steps = _state(case, hyper["amsgrad"])
    copies = [[t.double().cpu() for t in ts] for ts in (case.params, exp_avgs, exp_avg_sqs, maxes)]
    g64 = [g.cpu() for g in case.masked64()]
    steps64 = [
        s.double().cpu() + 1 for s in steps
    ]  # torch's fused Adam takes the counts already advanced
    impl.ops("adam_step").adam_step_(
        case.params,
        case.grads,
        case.factors,
        exp_avgs,
        exp_avg_sqs,
        maxes,
        steps,
        case.head_scale,
        case.grad_scale,
        None,
        **hyper,
    )
    fused = torch._fused_adamw_ if hyper.pop("decoupled") else torch._fused_adam_
    fused(copies[0], g64, copies[1], copies[2], copies[3], steps64, **hyper)
    assert [s.item() for s in steps] == [s.item() for s in steps64], (
        "the step counts are advanced by one"
    )
    for ours, oracle in zip((case.params, exp_avgs, exp_avg_sqs, maxes), copies, strict=True):
        assert_close(ours, oracle, dtype)


@pytest.mark.parametrize("impl", IMPLS.values(), ids=list(IMPLS))
def test_a_tensor_lr_is_read_like_a_float(impl):
    hyper = CONFIGS["adamw"]
    results = []
    for lr in (hyper["lr"], torch.tensor(hyper["lr"], dtype=torch.float64, device=impl.device)):
        case = problem(impl, torch.float32, 4)
        exp_avgs, exp_avg_sqs, _, steps = _state(case, False)
        impl.ops("adam_step").adam_step_(
            case.params,
            case.grads,
            case.factors,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            case.head_scale,
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
        case.factors,
        exp_avgs,
        exp_avg_sqs,
        [],
        steps,
        case.head_scale,
        None,
        torch.ones((), device=impl.device),
        **CONFIGS["adamw"],
    )
    assert all(
        torch.equal(a, b)
        for a, b in zip(case.params + exp_avgs + exp_avg_sqs + steps, before, strict=True)
    )


@pytest.mark.parametrize("impl", IMPLS.values(), ids=list(IMPLS))
def test_betas_zero_match_torch_in_float32(impl):
    case = problem(impl, torch.float32, 6)
    exp_avgs, exp_avg_sqs, _, steps = _state(case, False)
    copies = [[t.cpu().clone() for t in ts] for ts in (case.params, exp_avgs, exp_avg_sqs)]
    grads32 = [
        g.cpu().clone() for g in case.grads
    ]  # masked as the reference masks .grad: the spec's path
    reference.soft_mask_(
        grads32[:N_SHARED],
        reference.keep_factors([a.cpu() for a in case.importances]),
        grads32[N_SHARED:],
        case.head_scale.cpu(),
    )
    torch._fused_adam_(
        copies[0], grads32, copies[1], copies[2], [], [s.cpu() + 1 for s in steps], **BETAS_ZERO
    )
    impl.ops("adam_step").adam_step_(
        case.params,
        case.grads,
        case.factors,
        exp_avgs,
        exp_avg_sqs,
        [],
        steps,
        case.head_scale,
        None,
        None,
        decoupled=False,
        **BETAS_ZERO,
    )
    for ours, theirs in zip((case.params, exp_avgs, exp_avg_sqs), copies, strict=True):
        assert_close(ours, [t.double() for t in theirs], torch.float32)
