"""Checks that only mean something on a CUDA GPU (`make gpu` runs them): tensors
past 2**31 elements, and a whole masked optimizer step captured in a CUDA graph and replayed.
Skipped where there is no CUDA device."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from spg_fast import SPG, optim, reference
from tests.helpers import MultiHeadNet, make_tasks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def _needs_free_gib(gib: int) -> None:
    if torch.cuda.mem_get_info()[0] < gib * 2**30:
        pytest.skip(f"needs {gib} GiB of free GPU memory")


def test_tensors_past_2_31_elements_are_addressed_correctly():
    """Int64 offsets: a tensor of 2**31 + 1029 elements is masked, stepped and measured right at its
    start, across the 2**31 boundary and at its end."""
    from spg_fast.kernels.triton.importance_max import importance_max_
    from spg_fast.kernels.triton.sgd_step import sgd_step_
    from spg_fast.kernels.triton.soft_mask import soft_mask_

    _needs_free_gib(40)
    n = 2**31 + 1029
    spots = [slice(0, 4096), slice(2**31 - 4096, 2**31 + 4096), slice(n - 4096, n)]
    gen = torch.Generator(CUDA).manual_seed(0)
    g = torch.randn(n, device=CUDA, generator=gen)
    a = torch.rand(n, device=CUDA, generator=gen)
    p = torch.randn(n, device=CUDA, generator=gen)
    want_p = [p[s] - 0.5 * (g[s] * (1 - a[s])) for s in spots]
    sgd_step_(
        [p],
        [g],
        [a],
        [],
        [False],
        torch.ones(1, device=CUDA),
        None,
        None,
        lr=0.5,
        weight_decay=0.0,
        momentum=0.0,
        dampening=0.0,
        nesterov=False,
        maximize=False,
    )
    for s, want in zip(spots, want_p, strict=True):
        torch.testing.assert_close(p[s], want, rtol=0, atol=1e-6)
    del p
    want_g = [g[s] * (1 - a[s]) for s in spots]
    soft_mask_([g], [a], [], torch.ones(1, device=CUDA))
    for s, want in zip(spots, want_g, strict=True):
        assert torch.equal(g[s], want)
    x = g.double()
    var, mean = torch.var_mean(x, correction=1)
    want_a = [torch.maximum(a[s], ((x[s] - mean) / var.sqrt()).tanh().abs().float()) for s in spots]
    del x
    flags = importance_max_([a], [g])
    assert not flags.any()
    for s, want in zip(spots, want_a, strict=True):
        torch.testing.assert_close(a[s], want, rtol=0, atol=2e-7)


def _train_setup(seed: int = 0):
    torch.manual_seed(seed)
    model = MultiHeadNet().to(CUDA)
    spg = SPG(model, heads=model.heads)
    tasks = [[(x.to(CUDA), y.to(CUDA)) for x, y in batches] for batches in make_tasks()]
    spg.end_task(0, tasks[0])
    return model, spg, tasks


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_a_masked_step_replays_in_a_cuda_graph(name):
    """Capture spg_fast.optim's masked step (static gradients) in torch.cuda.CUDAGraph; each replay
    must equal an eager step of a twin, so nothing in the steady-state step allocates host memory,
    copies to the device or synchronises, and captured pointers stay valid."""
    model, spg, tasks = _train_setup()
    twin = copy.deepcopy(model)
    twin_spg = SPG(twin, heads=twin.heads)
    twin_spg.load_state_dict(spg.state_dict())
    make = {
        "sgd": lambda m, s: optim.SGD(m.parameters(), lr=0.05, momentum=0.9, spg=s),
        "adamw": lambda m, s: optim.AdamW(m.parameters(), lr=1e-2, spg=s),
    }[name]
    ours, theirs = make(model, spg), make(twin, twin_spg)
    x, y = tasks[1][0]
    for m in (model, twin):
        F.cross_entropy(m(x, 1), y).backward()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up: state, compiled kernels and launch plans exist before capture
            ours.step()
            theirs.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ours.step()
    for _ in range(5):
        graph.replay()
        theirs.step()
    torch.cuda.synchronize()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_importance_matches_the_reference_on_the_gpu():
    """The compiled importance kernel against the float64 reference on a model-sized
    gradient list."""
    from spg_fast.kernels.triton.importance_max import importance_max_

    gen = torch.Generator(CUDA).manual_seed(1)
    shapes = [(4096, 1023), (7,), (1,), (0,), (513, 3, 3)]
    grads = [torch.randn(s, device=CUDA, generator=gen) * 3 + 1 for s in shapes]
    acc = [torch.rand(s, device=CUDA, generator=gen) * 0.5 for s in shapes]
    want = [a.clone() for a in acc]
    reference.importance_max_(want, grads)
    importance_max_(acc, grads)
    for a, w in zip(acc, want, strict=True):
        torch.testing.assert_close(a, w, rtol=0, atol=2e-7)
