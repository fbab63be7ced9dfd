"""Checks that only mean something on a CUDA GPU (`make gpu` runs them): tensors past 2**31
elements, a whole masked optimizer step captured in a CUDA graph and replayed, and the compiled
kernels (not the interpreter) against the reference in every keep format. Skipped where there is
no CUDA device."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from spg_fast import SPG, optim, reference, storage
from tests.helpers import MultiHeadNet, make_tasks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def _needs_free_gib(gib: int) -> None:
    if torch.cuda.mem_get_info()[0] < gib * 2**30:
        pytest.skip(f"needs {gib} GiB of free GPU memory")


def test_tensors_past_2_31_elements_are_addressed_correctly():
    """Int64 offsets: a tensor of 2**31 + 1029 elements with uint8 keep factors is masked, stepped
    (update mode) and measured right at its start, across the 2**31 boundary and at its end."""
    from spg_fast.kernels.triton.accumulate import accumulate_
    from spg_fast.kernels.triton.sgd_step import sgd_step_
    from spg_fast.kernels.triton.soft_mask import soft_mask_

    _needs_free_gib(40)
    n = 2**31 + 1029
    spots = [slice(0, 4096), slice(2**31 - 4096, 2**31 + 4096), slice(n - 4096, n)]
    gen = torch.Generator(CUDA).manual_seed(0)
    g = torch.randn(n, device=CUDA, generator=gen)
    a = storage.encode(torch.rand(n, device=CUDA, generator=gen), torch.uint8)
    keep = [storage.decode(a[s]) for s in spots]
    p = torch.randn(n, device=CUDA, generator=gen)
    want_p = [p[s] - k * (0.5 * g[s] + 0.5 * 0.1 * p[s]) for s, k in zip(spots, keep, strict=True)]
    sgd_step_(
        [p],
        [g],
        [a],
        [],
        [False],
        torch.ones(1, device=CUDA),
        True,
        None,
        None,
        lr=0.5,
        weight_decay=0.1,
        momentum=0.0,
        dampening=0.0,
        nesterov=False,
        maximize=False,
    )
    for s, want in zip(spots, want_p, strict=True):
        torch.testing.assert_close(p[s], want, rtol=0, atol=1e-6)
    del p
    want_g = [g[s] * k for s, k in zip(spots, keep, strict=True)]
    soft_mask_([g], [a], [], torch.ones(1, device=CUDA))
    for s, want in zip(spots, want_g, strict=True):
        assert torch.equal(g[s], want)
    x = g.double()
    var, mean = torch.var_mean(x, correction=1)
    z = [((x[s] - mean) / var.sqrt()).abs() for s in spots]
    del x
    want_a = [
        torch.minimum(
            a[s], storage.encode(2 * (-2 * zs).exp() / (1 + (-2 * zs).exp()), torch.uint8)
        )
        for s, zs in zip(spots, z, strict=True)
    ]
    flags = accumulate_([a], [g])
    assert not flags.any()
    for s, want in zip(spots, want_a, strict=True):
        assert int((a[s].int() - want.int()).abs().max()) <= 1  # a code apart at most (ties)


@pytest.mark.parametrize("keep_dtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_compiled_mask_kernels_match_the_reference_bit_for_bit(keep_dtype):
    """Compiled (FMA contraction is the compiler's default, the mask kernels turn it off): the soft
    mask and the update mask give the reference's bits for every keep format, every code of the
    narrow formats included."""
    from spg_fast.kernels.triton.soft_mask import scale_updates_, soft_mask_

    gen = torch.Generator(CUDA).manual_seed(2)
    shapes = [(4096, 1023), (7,), (1,), (0,), (513, 3, 3)]
    keeps = [storage.encode(torch.rand(s, device=CUDA, generator=gen), keep_dtype) for s in shapes]
    if keep_dtype == torch.uint8:
        keeps[0].view(-1)[:256] = torch.arange(256, device=CUDA).to(torch.uint8)
    elif keep_dtype == torch.bfloat16:
        codes = torch.arange(0x3F81, device=CUDA, dtype=torch.int16).view(torch.bfloat16)
        keeps[0].view(-1)[: codes.numel()] = codes
    scale = reference.head_scale([k for k in keeps if k.numel()]).float()
    for dtype in (torch.float32, torch.bfloat16):
        xs = [torch.randn(s, device=CUDA, generator=gen).to(dtype) for s in shapes]
        heads = [torch.randn(9, device=CUDA, generator=gen).to(dtype)]
        before = [(x.float() + 0.01 * torch.randn_like(x.float())).to(dtype) for x in xs + heads]
        for update in (False, True):
            ours, theirs = [[x.clone() for x in xs + heads] for _ in range(2)]
            if update:
                scale_updates_(ours[:-1], before[:-1], keeps, ours[-1:], before[-1:], scale)
                copies = [b.clone() for b in before]
                reference.scale_updates_(
                    theirs[:-1], copies[:-1], keeps, theirs[-1:], copies[-1:], scale
                )
            else:
                soft_mask_(ours[:-1], keeps, ours[-1:], scale)
                reference.soft_mask_(theirs[:-1], keeps, theirs[-1:], scale)
            for a, b in zip(ours, theirs, strict=True):
                assert torch.equal(a, b), (dtype, update)


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


@pytest.mark.parametrize("keep_dtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_accumulation_matches_the_reference_on_the_gpu(keep_dtype):
    """The compiled accumulation kernel against the float64 reference on a model-sized gradient
    list: the same stored value, or one step apart where float64 noise meets a rounding tie."""
    from spg_fast.kernels.triton.accumulate import accumulate_

    gen = torch.Generator(CUDA).manual_seed(1)
    shapes = [(4096, 1023), (7,), (1,), (0,), (513, 3, 3)]
    grads = [torch.randn(s, device=CUDA, generator=gen) * 3 + 1 for s in shapes]
    stored = [
        storage.encode(1 - torch.rand(s, device=CUDA, generator=gen) * 0.5, keep_dtype)
        for s in shapes
    ]
    want = [a.clone() for a in stored]
    reference.accumulate_(want, grads)
    accumulate_(stored, grads)
    as_int = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.uint8: torch.uint8}
    for a, w in zip(stored, want, strict=True):
        if a.numel():
            steps = (a.view(as_int[keep_dtype]).long() - w.view(as_int[keep_dtype]).long()).abs()
            assert int(steps.max()) <= 1
            assert float((steps > 0).float().mean()) < 1e-4
