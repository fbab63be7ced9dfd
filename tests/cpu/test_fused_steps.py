"""The native CPU masked optimizer steps against torch's fused optimizers run in float64 on the masked gradient."""

from __future__ import annotations

import pytest
import torch

from spg_fast.cpu import steps

# Odd sizes, one-element and zero-size tensors, and one big enough (> 32768 in all) that the step is cut into
# per-thread slices that start inside tensors.
SHAPES = [(7, 3), (0,), (1,), (40001,), (5, 0), (1023,), (3, 700)]
N_SHARED = 4
SGD_CONFIGS = {
    "plain": dict(lr=0.1, weight_decay=0.0, momentum=0.0, dampening=0.0, nesterov=False, maximize=False),
    "momentum-wd-dampening": dict(lr=0.05, weight_decay=0.01, momentum=0.9, dampening=0.2, nesterov=False,
                                  maximize=False),
    "nesterov-maximize": dict(lr=0.05, weight_decay=0.0, momentum=0.8, dampening=0.0, nesterov=True, maximize=True),
}
ADAM_CONFIGS = {
    "adam": dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False, amsgrad=False,
                 maximize=False),
    "adam-wd-amsgrad-maximize": dict(lr=1e-2, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1, decoupled=False,
                                     amsgrad=True, maximize=True),
    "adamw": dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.5, decoupled=True, amsgrad=False,
                  maximize=False),
}
# One step against the float64 oracle: the largest float32 error measured was 1.8e-7 * (1 + |value|), about one
# and a half ulps, allowed 2.4e-7 * (1 + |value|); float64 measured bit-identical to torch's float64 fused kernels
# (same operation order), allowed 4 ulps for compilers that contract to FMA differently.
TOL = {torch.float32: dict(rtol=2.0**-22, atol=2.0**-22), torch.float64: dict(rtol=2.0**-50, atol=2.0**-50)}


def _problem(dtype: torch.dtype, seed: int, grad_scale: float | None):
    """Random parameters, gradients, keep factors for the shared ones, a head scale and scaler tensors."""
    gen = torch.Generator().manual_seed(seed)

    def rand(shape, low=None):
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        return (x.abs() if low == 0 else x).to(dtype)

    params = [rand(s) for s in SHAPES]
    scale_factor = 1.0 if grad_scale is None else grad_scale
    grads = [rand(s) * scale_factor for s in SHAPES]
    factors = [torch.rand(s, generator=gen, dtype=torch.float64).to(dtype) for s in SHAPES[:N_SHARED]]
    head = torch.rand((), generator=gen).to(torch.float32)
    scaler = None if grad_scale is None else torch.tensor(grad_scale, dtype=torch.float32)
    return params, grads, factors, head, scaler, rand


def _masked64(grads, factors, head, scaler):
    out = [g.double() / (1.0 if scaler is None else scaler.double()) for g in grads]
    return [g * f.double() for g, f in zip(out, factors, strict=False)] + [g * head.double()
                                                                             for g in out[len(factors):]]


def _assert_close(ours, oracle, dtype):
    for a, b in zip(ours, oracle, strict=True):
        torch.testing.assert_close(a.double(), b, **TOL[dtype])


@pytest.mark.parametrize("dtype", list(steps.DTYPES))
@pytest.mark.parametrize("config", list(SGD_CONFIGS))
@pytest.mark.parametrize("grad_scale", [None, 1024.0])
def test_sgd_matches_torch_in_float64(dtype, config, grad_scale):
    hyper = SGD_CONFIGS[config]
    params, grads, factors, head, scaler, rand = _problem(dtype, 1, grad_scale)
    momentum = hyper["momentum"] != 0
    bufs = [rand(s) for s in SHAPES] if momentum else []
    first = [momentum and i % 2 == 0 for i in range(len(SHAPES))]
    p64, b64 = [p.double() for p in params], [b.double() for b in bufs]
    g64 = _masked64(grads, factors, head, scaler)
    steps.sgd_step_(params, grads, factors, bufs, first, head, scaler, None, **hyper)
    for is_first in (True, False):
        chosen = [i for i, f in enumerate(first) if f == is_first]
        if chosen:
            torch._fused_sgd_([p64[i] for i in chosen], [g64[i] for i in chosen],
                              [b64[i] for i in chosen] if momentum else [], is_first_step=is_first, **hyper)
    _assert_close(params, p64, dtype)
    _assert_close(bufs, b64, dtype)


@pytest.mark.parametrize("dtype", list(steps.DTYPES))
@pytest.mark.parametrize("config", list(ADAM_CONFIGS))
@pytest.mark.parametrize("grad_scale", [None, 1024.0])
def test_adam_matches_torch_in_float64(dtype, config, grad_scale):
    hyper = dict(ADAM_CONFIGS[config])
    params, grads, factors, head, scaler, rand = _problem(dtype, 2, grad_scale)
    exp_avgs = [rand(s) * 0.1 for s in SHAPES]
    exp_avg_sqs = [rand(s, low=0) * 0.01 for s in SHAPES]
    maxes = [v + rand(s, low=0) * 0.01 for v, s in zip(exp_avg_sqs, SHAPES, strict=True)] if hyper["amsgrad"] else []
    step_counts = [torch.tensor(float(1 + 3 * i)) for i in range(len(SHAPES))]  # a head added later has fewer
    copies = [[t.double() for t in ts] for ts in (params, exp_avgs, exp_avg_sqs, maxes)]
    g64 = _masked64(grads, factors, head, scaler)
    steps.adam_step_(params, grads, factors, exp_avgs, exp_avg_sqs, maxes, step_counts, head, scaler, None,
                     **hyper)
    fused = torch._fused_adamw_ if hyper.pop("decoupled") else torch._fused_adam_
    fused(copies[0], g64, copies[1], copies[2], copies[3], [s.clone() for s in step_counts], **hyper)
    for ours, oracle in zip((params, exp_avgs, exp_avg_sqs, maxes), copies, strict=True):
        _assert_close(ours, oracle, dtype)


def test_no_mask_before_the_first_task_and_grad_untouched():
    params, grads, _, _, _, _ = _problem(torch.float32, 3, None)
    expected = [p.clone() for p in params]
    torch._fused_sgd_(expected, [g.clone() for g in grads], [], is_first_step=False, lr=0.1, weight_decay=0.0,
                      momentum=0.0, dampening=0.0, nesterov=False, maximize=False)
    before = [g.clone() for g in grads]
    steps.sgd_step_(params, grads, [], [], [False] * len(params), None, None, None, **SGD_CONFIGS["plain"])
    for a, b in zip(params, expected, strict=True):
        assert torch.equal(a, b)
    assert all(torch.equal(g, b) for g, b in zip(grads, before, strict=True))


def test_found_inf_skips_every_tensor():
    params, grads, factors, head, _, rand = _problem(torch.float32, 4, None)
    state = [[rand(s) * 0.1 for s in SHAPES], [rand(s, low=0) for s in SHAPES]]
    before = [t.clone() for t in params + state[0] + state[1]]
    steps.adam_step_(params, grads, factors, *state, [], [torch.tensor(1.0)] * len(SHAPES), head, None,
                     torch.ones(()), **ADAM_CONFIGS["adamw"])
    assert all(torch.equal(a, b) for a, b in zip(params + state[0] + state[1], before, strict=True))


def test_result_does_not_depend_on_the_thread_count():
    results = []
    for threads in (1, 2, 3):
        params, grads, factors, head, _, rand = _problem(torch.float32, 5, None)
        bufs = [rand(s) for s in SHAPES]
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            steps.sgd_step_(params, grads, factors, bufs, [False] * len(SHAPES), head, None, None,
                            **SGD_CONFIGS["momentum-wd-dampening"])
        finally:
            torch.set_num_threads(previous)
        results.append(params + bufs)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))


@pytest.mark.parametrize("bad, message", [
    (lambda ts: [ts[0].t(), *ts[1:]], r"shape \(3, 7\) is not contiguous"),
    (lambda ts: [ts[0].double(), *ts[1:]], r"shape \(0,\) is torch.float32 where the first is torch.float64"),
    (lambda ts: [t.bfloat16() for t in ts], r"dtype torch.bfloat16 is not one of"),
])
def test_what_the_native_steps_cannot_take_is_named(bad, message):
    params, grads, factors, head, _, _ = _problem(torch.float32, 6, None)
    bad_params = bad(params)
    before = [p.clone() for p in bad_params]
    with pytest.raises(ValueError, match=message):
        steps.sgd_step_(bad_params, grads, factors, [], [False] * len(SHAPES), head, None, None,
                        **SGD_CONFIGS["plain"])
    assert all(torch.equal(a, b) for a, b in zip(bad_params, before, strict=True))


def test_a_gradient_of_another_size_is_named():
    params, grads, factors, head, _, _ = _problem(torch.float32, 7, None)
    with pytest.raises(ValueError, match=r"shape \(22,\) goes with a parameter of shape \(7, 3\)"):
        steps.sgd_step_(params, [torch.zeros(22), *grads[1:]], factors, [], [False] * len(SHAPES), head, None,
                        None, **SGD_CONFIGS["plain"])


def test_lists_of_other_lengths_are_named():
    params, grads, factors, head, _, rand = _problem(torch.float32, 8, None)
    state = [rand(s) for s in SHAPES]
    with pytest.raises(ValueError, match=r"7 parameters take 7 gradients, at most 7 mask factors and 7 exp_avgs, 7 "
                                         r"exp_avg_sqs, 7 max_exp_avg_sqs; got 6 gradients, 4 mask factors and 7 "
                                         r"exp_avgs, 5 exp_avg_sqs, 0 max_exp_avg_sqs"):
        steps.adam_step_(params, grads[:-1], factors, state, state[:5], [], [torch.tensor(1.0)] * 7, head, None, None,
                         **{**ADAM_CONFIGS["adam"], "amsgrad": True})
    with pytest.raises(ValueError, match=r"and 0 momentum buffers; got 7 gradients, 4 mask factors and 7 momentum"):
        steps.sgd_step_(params, grads, factors, state, [False] * 7, head, None, None, **SGD_CONFIGS["plain"])
