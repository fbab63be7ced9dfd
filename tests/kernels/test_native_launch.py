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


@pytest.mark.parametrize("update", [False, True], ids=["gradient", "update"])
def test_result_does_not_depend_on_the_thread_count(update):
    results = []
    for threads in (1, 2, 3):
        case = problem(NATIVE, torch.float32, 5, keep_dtype=torch.uint8)
        bufs = [case.rand(s) for s in case.shapes]
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            sgd_step_(
                case.params,
                case.grads,
                case.keeps,
                bufs,
                [False] * len(bufs),
                case.head_scale,
                update,
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


def _sgd(params, grads, keeps):
    sgd_step_(
        params,
        grads,
        keeps,
        [],
        [False] * len(params),
        torch.tensor(0.5),
        True,
        None,
        None,
        **PLAIN,
    )


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda ps, ks: ([ps[0].t(), *ps[1:]], ks), r"shape \(3, 7\) is not contiguous"),
        (
            lambda ps, ks: ([ps[0].double(), *ps[1:]], ks),
            r"shape \(0,\) is torch.float32 where the first is torch.float64",
        ),
        (lambda ps, ks: ([p.bfloat16() for p in ps], ks), r"dtype torch.bfloat16 is not one of"),
        (
            lambda ps, ks: ([ps[0].as_subclass(_Sub), *ps[1:]], ks),
            r"shape \(7, 3\) is a _Sub, not a plain tensor",
        ),
        (
            lambda ps, ks: (ps, [k.half() for k in ks]),
            r"keep factors in torch.float16 are not one of",
        ),
        (
            lambda ps, ks: (ps, [ks[0].float(), *ks[1:]]),
            r"the keep factors are not all of one dtype",
        ),
        (lambda ps, ks: (ps, [ks[0].t(), *ks[1:]]), r"shape \(3, 7\) is not contiguous"),
        (
            lambda ps, ks: (ps, [ks[0][:2], *ks[1:]]),
            r"shape \(2, 3\) goes with a parameter of shape \(7, 3\)",
        ),
    ],
    ids=[
        "non-contiguous",
        "mixed-dtypes",
        "bfloat16-params",
        "subclass",
        "float16-keeps",
        "mixed-keep-formats",
        "non-contiguous-keeps",
        "keeps-of-another-size",
    ],
)
def test_what_the_native_steps_cannot_take_is_named(bad, message):
    case = problem(NATIVE, torch.float32, 6, keep_dtype=torch.uint8)
    params, keeps = bad(case.params, case.keeps)
    before = [p.clone() for p in params]
    with pytest.raises(ValueError, match=message):
        _sgd(params, case.grads, keeps)
    assert all(torch.equal(a, b) for a, b in zip(params, before, strict=True))


def test_a_gradient_of_another_size_is_named():
    case = problem(NATIVE, torch.float32, 7)
    before = [p.clone() for p in case.params]
    with pytest.raises(ValueError, match=r"shape \(22,\) goes with a parameter of shape \(7, 3\)"):
        _sgd(case.params, [torch.zeros(22), *case.grads[1:]], case.keeps)
    assert all(torch.equal(a, b) for a, b in zip(case.params, before, strict=True))


def test_lists_of_other_lengths_are_named():
    case = problem(NATIVE, torch.float32, 8)
    state = [case.rand(s) for s in case.shapes]
    with pytest.raises(ValueError, match=r"adam step: 7 parameters take .*got .*5"):
        adam_step_(
            case.params,
            case.grads,
            case.keeps,
            state,
            state[:5],
            [],
            [torch.tensor(1.0)] * 7,
            case.head_scale,
            False,
            None,
            None,
            **ADAM,
        )
    with pytest.raises(ValueError, match=r"7 parameters take 7 gradients, got 6"):
        adam_step_(
            case.params,
            case.grads[:-1],
            case.keeps,
            state,
            state,
            state,
            [torch.tensor(1.0)] * 7,
            case.head_scale,
            False,
            None,
            None,
            **ADAM,
        )
    with pytest.raises(ValueError, match=r"sgd step: 7 parameters take 0 momentum buffers, got 7"):
        sgd_step_(
            case.params,
            case.grads,
            case.keeps,
            state,
            [False] * 7,
            case.head_scale,
            False,
            None,
            None,
            **PLAIN,
        )
    with pytest.raises(ValueError, match=r"at most 7 keep factors"):
        _sgd(case.params, case.grads, case.keeps * 2)
