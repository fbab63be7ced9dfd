"""What is particular to the native CPU steps' launch: results independent of the thread count, and
the checks that keep the C code memory-safe (what it cannot take is named and nothing is written).
Their arithmetic is tested per op in test_sgd_step and test_adam_step."""

from __future__ import annotations

import pytest
import torch

from spg_fast.kernels.cpu.adam_step import adam_step_
from spg_fast.kernels.cpu.sgd_step import sgd_step_
from tests.kernels.step_cases import IMPLS, problem

NATIVE = IMPLS["native"]
PLAIN = dict(lr=0.1, weight_decay=0.0, momentum=0.0, dampening=0.0, nesterov=False, maximize=False)
MOMENTUM = dict(PLAIN, lr=0.05, weight_decay=0.01, momentum=0.9, dampening=0.2)
ADAM = dict(
    lr=1e-2,
    beta1=0.9,
    beta2=0.999,
    eps=1e-8,
    weight_decay=0.0,
    decoupled=False,
    amsgrad=True,
    maximize=False,
)


def test_result_does_not_depend_on_the_thread_count():
    results = []
    for threads in (1, 2, 3):
        case = problem(NATIVE, torch.float32, 5)
        bufs = [case.rand(s) for s in case.shapes]
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            sgd_step_(
                case.params,
                case.grads,
                case.factors,
                bufs,
                [False] * len(bufs),
                case.head_scale,
                None,
                None,
                **MOMENTUM,
            )
        finally:
            torch.set_num_threads(previous)
        results.append(case.params + bufs)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))


class _Sub(torch.Tensor):
    """A tensor subclass, as FSDP2's DTensor is one."""


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda ts: [ts[0].t(), *ts[1:]], r"shape \(3, 7\) is not contiguous"),
        (
            lambda ts: [ts[0].double(), *ts[1:]],
            r"shape \(0,\) is torch.float32 where the first is torch.float64",
        ),
        (lambda ts: [t.bfloat16() for t in ts], r"dtype torch.bfloat16 is not one of"),
        (
            lambda ts: [ts[0].as_subclass(_Sub), *ts[1:]],
            r"shape \(7, 3\) is a _Sub, not a plain tensor",
        ),
    ],
)
def test_what_the_native_steps_cannot_take_is_named(bad, message):
    case = problem(NATIVE, torch.float32, 6)
    bad_params = bad(case.params)
    before = [p.clone() for p in bad_params]
    with pytest.raises(ValueError, match=message):
        sgd_step_(
            bad_params,
            case.grads,
            case.factors,
            [],
            [False] * len(bad_params),
            case.head_scale,
            None,
            None,
            **PLAIN,
        )
    assert all(torch.equal(a, b) for a, b in zip(bad_params, before, strict=True))


def test_a_gradient_of_another_size_is_named():
    case = problem(NATIVE, torch.float32, 7)
    with pytest.raises(ValueError, match=r"shape \(22,\) goes with a parameter of shape \(7, 3\)"):
        sgd_step_(
            case.params,
            [torch.zeros(22), *case.grads[1:]],
            case.factors,
            [],
            [False] * len(case.params),
            case.head_scale,
            None,
            None,
            **PLAIN,
        )


def test_lists_of_other_lengths_are_named():
    case = problem(NATIVE, torch.float32, 8)
    state = [case.rand(s) for s in case.shapes]
    with pytest.raises(
        ValueError,
        match=r"7 parameters take 7 gradients, at most 7 mask factors and 7 exp_avgs, 7 "
        r"exp_avg_sqs, 7 max_exp_avg_sqs; got 6 gradients, 4 mask factors and 7 "
        r"exp_avgs, 5 exp_avg_sqs, 0 max_exp_avg_sqs",
    ):
        adam_step_(
            case.params,
            case.grads[:-1],
            case.factors,
            state,
            state[:5],
            [],
            [torch.tensor(1.0)] * 7,
            case.head_scale,
            None,
            None,
            **ADAM,
        )
    with pytest.raises(
        ValueError, match=r"and 0 momentum buffers; got 7 gradients, 4 mask factors and 7 momentum"
    ):
        sgd_step_(
            case.params,
            case.grads,
            case.factors,
            state,
            [False] * 7,
            case.head_scale,
            None,
            None,
            **PLAIN,
        )
