"""The masked SGD step kernels (Triton and native CPU) against torch's fused SGD run in float64 on
the masked gradient."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.step_cases import CASES, IMPLS, assert_close, problem

CONFIGS = {
    "plain": dict(
        lr=0.1, weight_decay=0.0, momentum=0.0, dampening=0.0, nesterov=False, maximize=False
    ),
    "momentum-wd-dampening": dict(
        lr=0.05, weight_decay=0.01, momentum=0.9, dampening=0.2, nesterov=False, maximize=False
    ),
    "nesterov-maximize": dict(
        lr=0.05, weight_decay=0.0, momentum=0.8, dampening=0.0, nesterov=True, maximize=True
    ),
}


def _oracle(params, grads, bufs, first, hyper):
    p64, b64 = [p.double().cpu() for p in params], [b.double().cpu() for b in bufs]
    for is_first in (True, False):
        chosen = [i for i, f in enumerate(first) if f == is_first]
        if chosen:
            torch._fused_sgd_(
                [p64[i] for i in chosen],
                [grads[i].cpu() for i in chosen],
                [b64[i] for i in chosen] if bufs else [],
                is_first_step=is_first,
                **{**hyper, "lr": float(hyper["lr"])},
            )
    return p64, b64


@pytest.mark.parametrize("impl, dtype", CASES)
@pytest.mark.parametrize(
    "config, grad_scale", [*((c, None) for c in CONFIGS), ("momentum-wd-dampening", 1024.0)]
)
def test_matches_torch_in_float64(impl, dtype, config, grad_scale):
    hyper = CONFIGS[config]
    case = problem(impl, dtype, 1, grad_scale)
    momentum = hyper["momentum"] != 0
    bufs = [case.rand(s) for s in case.shapes] if momentum else []
    first = [momentum and i % 2 == 0 for i in range(len(case.shapes))]
    p64, b64 = _oracle(case.params, case.masked64(), bufs, first, hyper)
    impl.ops("sgd_step").sgd_step_(
        case.params,
        case.grads,
        case.factors,
        bufs,
        first,
        case.head_scale,
        case.grad_scale,
        None,
        **hyper,
    )
    assert_close(case.params, p64, dtype)
    assert_close(bufs, b64, dtype)


@pytest.mark.parametrize("impl", IMPLS.values(), ids=list(IMPLS))
def test_a_tensor_lr_is_read_like_a_float(impl):
    hyper = CONFIGS["momentum-wd-dampening"]
    results = []
    for lr in (hyper["lr"], torch.tensor(hyper["lr"], dtype=torch.float64, device=impl.device)):
        case = problem(impl, torch.float32, 2)
        bufs = [case.rand(s) for s in case.shapes]
        impl.ops("sgd_step").sgd_step_(
            case.params,
            case.grads,
            case.factors,
            bufs,
            [False] * len(case.shapes),
            case.head_scale,
            None,
            None,
            **{**hyper, "lr": lr},
        )
        results.append(case.params + bufs)
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


@pytest.mark.parametrize("impl", IMPLS.values(), ids=list(IMPLS))
def test_no_mask_before_the_first_task_and_grad_untouched(impl):
    case = problem(impl, torch.float32, 3)
    expected, _ = _oracle(
        case.params,
        [g.double() for g in case.grads],
        [],
        [False] * len(case.shapes),
        CONFIGS["plain"],
    )
    before = [g.clone() for g in case.grads]
    impl.ops("sgd_step").sgd_step_(
        case.params,
        case.grads,
        [],
        [],
        [False] * len(case.shapes),
        None,
        None,
        None,
        **CONFIGS["plain"],
    )
    assert_close(case.params, expected, torch.float32)
    assert all(torch.equal(g, b) for g, b in zip(case.grads, before, strict=True))
