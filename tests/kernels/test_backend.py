"""Backend dispatch, and SPG end to end on the Triton kernels against the reference backend."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from spg_fast import SPG, storage
from spg_fast._backend import resolve_backend
from tests.helpers import MultiHeadNet, make_tasks
from tests.kernels.common import DEVICE


def _named(dtype=torch.float32, device=DEVICE):
    return [("trunk.weight", torch.zeros(3, dtype=dtype, device=device))]


def test_auto_uses_triton_only_on_cuda():
    assert resolve_backend("auto", _named()).name == (
        "triton" if DEVICE.type == "cuda" else "torch"
    )
    assert resolve_backend("torch", _named()).name == "torch"


def test_unknown_backend_lists_the_valid_ones():
    with pytest.raises(ValueError, match="'cuda' is not one of auto, torch, triton"):
        resolve_backend("cuda", _named())


def test_explicit_triton_names_what_it_cannot_serve(monkeypatch):
    with pytest.raises(ValueError, match=r"'trunk\.weight' has dtype torch\.float64"):
        resolve_backend("triton", _named(torch.float64))
    with pytest.raises(ValueError, match=r"importance_dtype torch\.float16"):
        resolve_backend("triton", _named(), torch.float16)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(
        ValueError, match="on the CPU, where Triton runs only with TRITON_INTERPRET=1"
    ):
        resolve_backend("triton", _named(device=torch.device("cpu")))


OPTIMIZERS = {
    # mask="auto": the paper's gradient mask for SGD without weight decay, the update mask for AdamW
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
}


def _train(backend: str, importance_dtype=None, optimizer="sgd"):
    torch.manual_seed(0)
    model = MultiHeadNet().to(DEVICE)
    spg = SPG(model, heads=model.heads, backend=backend, importance_dtype=importance_dtype)
    assert spg.backend == backend
    opt = spg.wrap(OPTIMIZERS[optimizer](model.parameters()))
    for task, batches in enumerate(make_tasks()):
        batches = [(x.to(DEVICE), y.to(DEVICE)) for x, y in batches]
        for _ in range(3):
            for x, y in batches:
                opt.zero_grad()
                F.cross_entropy(model(x, task), y).backward()
                opt.step()
        spg.end_task(task, batches)
    return model, spg


@pytest.mark.parametrize(
    "importance_dtype, optimizer",
    [(None, "sgd"), (torch.uint8, "adamw")],
    ids=["float32-sgd-gradient", "uint8-adamw-update"],
)
def test_training_on_the_kernels_matches_the_reference_bit_for_bit(importance_dtype, optimizer):
    kernel_model, kernel_spg = _train("triton", importance_dtype, optimizer)
    ref_model, ref_spg = _train("torch", importance_dtype, optimizer)
    for (name, a), b in zip(kernel_model.named_parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(a, b), name
    for name, k in kernel_spg.keep_factors.items():
        assert k.dtype == (importance_dtype or torch.float32)
        assert torch.equal(k, ref_spg.keep_factors[name]), name
    assert torch.equal(kernel_spg.head_scale, ref_spg.head_scale)


@functools.cache
def _float32_run() -> SPG:
    return _train("torch")[1]


@pytest.mark.parametrize("importance_dtype", [torch.bfloat16, torch.uint8], ids=["bf16", "u8"])
def test_narrow_storage_stays_within_its_documented_bound(importance_dtype):
    """Keep factors stored narrow, after three tasks of training on them, against float32 storage:
    within the format's relative error, plus 2**-8 of training drift (the masks differ by that
    error, so the trajectories do too)."""
    full = _float32_run()
    _, narrow = _train("torch", importance_dtype)
    bound = storage.RELATIVE_ERROR[importance_dtype]
    for name, k in full.keep_factors.items():
        got = storage.decode(narrow.keep_factors[name])
        assert bool(((got - k).abs() <= bound * k + 2.0**-8).all()), name
        assert bool((got > 0).all()), "no keep factor above 0 in float32 is stored as 0"


def test_custom_ops_trace_without_graph_breaks():
    grads = [torch.randn(5, 3, device=DEVICE), torch.randn(7, device=DEVICE)]
    keeps = [storage.encode(torch.rand(5, 3, device=DEVICE), torch.uint8)]
    params = [torch.randn(5, 3, device=DEVICE), torch.randn(7, device=DEVICE)]
    before = [p + 0.1 for p in params]
    scale = torch.tensor(0.5, device=DEVICE)

    def step(grads, keeps, params, before, scale):
        torch.ops.spg_fast.soft_mask_(grads[:1], keeps, grads[1:], scale)
        torch.ops.spg_fast.scale_updates_(
            params[:1], before[:1], keeps, params[1:], before[1:], scale
        )
        flags = torch.ops.spg_fast.accumulate_(keeps, grads[:1])
        return flags.any()

    want = [[t.clone() for t in ts] for ts in (grads, keeps, params)]
    step(*want, before, scale)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    compiled(grads, keeps, params, before, scale)
    for ours, theirs in zip((grads, keeps, params), want, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
