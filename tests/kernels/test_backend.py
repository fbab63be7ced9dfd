"""Backend dispatch, and SPG end to end on the Triton kernels against the reference backend."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from spg_fast import SPG
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


def _train(backend: str, importance_dtype=None):
    torch.manual_seed(0)
    model = MultiHeadNet().to(DEVICE)
    spg = SPG(model, heads=model.heads, backend=backend, importance_dtype=importance_dtype)
    assert spg.backend == backend
    opt = spg.wrap(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    for task, batches in enumerate(make_tasks()):
        batches = [(x.to(DEVICE), y.to(DEVICE)) for x, y in batches]
        for _ in range(3):
            for x, y in batches:
                opt.zero_grad()
                F.cross_entropy(model(x, task), y).backward()
                opt.step()
        spg.end_task(task, batches)
    return model, spg


@pytest.mark.parametrize("importance_dtype", [None, torch.bfloat16])
def test_training_on_the_kernels_matches_the_reference_bit_for_bit(importance_dtype):
    kernel_model, kernel_spg = _train("triton", importance_dtype)
    ref_model, ref_spg = _train("torch", importance_dtype)
    for (name, a), b in zip(kernel_model.named_parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(a, b), name
    for name, a in kernel_spg.importance.items():
        assert a.dtype == (importance_dtype or torch.float32)
        assert torch.equal(a, ref_spg.importance[name]), name


def test_bfloat16_importance_stays_within_its_documented_bound():
    _, full = _train("torch")
    _, half = _train("torch", torch.bfloat16)
    for name, a in full.importance.items():
        assert (half.importance[name].float() - a).abs().max() <= 2.0**-8  # training drift included


def test_custom_ops_trace_without_graph_breaks():
    grads = [torch.randn(5, 3, device=DEVICE), torch.randn(7, device=DEVICE)]
    imps = [torch.rand(5, 3, device=DEVICE)]
    scale = torch.tensor(0.5, device=DEVICE)

    def step(grads, imps, scale):
        torch.ops.spg_fast.soft_mask_(grads[:1], imps, grads[1:], scale)
        flags = torch.ops.spg_fast.importance_max_(imps, grads[:1])
        return flags.any()

    want_grads = [g.clone() for g in grads]
    want_imps = [a.clone() for a in imps]
    step(want_grads, want_imps, scale)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    compiled(grads, imps, scale)
    assert all(torch.equal(a, b) for a, b in zip(grads + imps, want_grads + want_imps, strict=True))
