"""The benchmarked ops and their competitors, each built on a fresh synthetic model of given
parameter shapes.

A ``Problem`` holds one copy of everything a step touches (parameters, gradients, stored keep
factors, optimizer state); ``IMPLEMENTATIONS[op]`` maps an implementation name to a factory
``problem -> step()``. Keep factors are uniform in (1 - 1e-3, 1] (importance below 1e-3) so that
repeating the mask thousands of times does not drive gradients into denormals; they are stored as
``importance_dtype`` says (``spg_fast.storage``; float32 by default).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import spg_fast
from spg_fast import SPG, reference
from spg_fast._backend import resolve_backend


class _Model(nn.Module):
    def __init__(
        self, shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.shared = nn.ParameterList(
            nn.Parameter(torch.randn(s, dtype=dtype, device=device)) for s in shapes
        )
        self.head = nn.Linear(8, 2, device=device, dtype=dtype)


@dataclass
class Problem:
    """``keeps``: SPG's stored keep factors (what its kernels read); ``factors``: the same decoded
    to float tensors (what torch's own ops multiply by)."""

    model: _Model
    spg: SPG
    params: list[Tensor]
    grads: list[Tensor]
    keeps: list[Tensor]
    factors: list[Tensor]

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


def make_problem(
    shapes: list[tuple[int, ...]],
    dtype: torch.dtype,
    device: torch.device,
    importance_dtype: torch.dtype | None = None,
) -> Problem:
    model = _Model(shapes, dtype, device)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    spg = SPG(model, heads="head", importance_dtype=importance_dtype)
    keep = {
        n: 1 - torch.rand(p.shape, device=device) * 1e-3 for n, p in spg.shared_parameters.items()
    }
    spg.load_state_dict({"format": 2, "tasks_finished": 1, "keep": keep})
    params = list(model.shared)
    keeps = list(spg.keep_factors.values())
    return Problem(
        model, spg, params, [p.grad for p in params], keeps, reference.keep_factors(keeps)
    )


def synthetic_shapes(numel: int, chunk: int = 1 << 20) -> list[tuple[int, ...]]:
    """``numel`` parameters as tensors of about a million elements (odd sizes, so no tile is
    ever exact)."""
    count = max(1, math.ceil(numel / chunk))
    base, extra = divmod(numel, count)
    return [(base + (1 if i < extra else 0),) for i in range(count)]


def resnet50_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of torchvision's ResNet-50 (convolutions and batch norms,
    25.5M parameters)."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    cin = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            for cout, k, ci in ((width, 1, cin), (width, 3, width), (width * 4, 1, width)):
                shapes += [(cout, ci, k, k), (cout,), (cout,)]
            if b == 0:
                shapes += [(width * 4, cin, 1, 1), (width * 4,), (width * 4,)]
            cin = width * 4
    return [*shapes, (1000, 2048), (1000,)]


def transformer_1b_shapes(
    d: int = 2048, layers: int = 20, vocab: int = 32000
) -> list[tuple[int, ...]]:
    """A GPT-style decoder of about 1.07B parameters: embedding, per layer qkv/proj/MLP weights,
    biases, norms."""
    shapes: list[tuple[int, ...]] = [(vocab, d)]
    for _ in range(layers):
        shapes += [
            (3 * d, d),
            (3 * d,),
            (d, d),
            (d,),
            (4 * d, d),
            (4 * d,),
            (d, 4 * d),
            (d,),
            (d,),
            (d,),
            (d,),
            (d,),
        ]
    return [*shapes, (d,), (d,)]


MODEL_SHAPES = {"resnet50": resnet50_shapes, "transformer-1b": transformer_1b_shapes}


def _eager_mask(pr: Problem) -> Callable[[], None]:
    def step() -> None:
        for g, k in zip(pr.grads, pr.factors, strict=True):
            g.mul_(k)

    return step


def _masked_then(
    optimizer: Callable[[list[Tensor]], torch.optim.Optimizer],
) -> Callable[[Problem], Callable]:
    """SPG's mask around torch's step (``spg.wrap``, ``mask="auto"``: the gradient mask for SGD
    without weight decay, the update mask for AdamW, as spg-fast's fused steps)."""

    def build(pr: Problem) -> Callable[[], None]:
        return pr.spg.wrap(optimizer(pr.params)).step

    return build


def _compiled_masked(
    optimizer: Callable[[list[Tensor]], torch.optim.Optimizer], update: bool
) -> Callable[[Problem], Callable]:
    """The masked step written with torch's own ops and compiled: the gradient times the keep
    factor before the step, or (``update``) the change the step made scaled by it."""

    def build(pr: Problem) -> Callable[[], None]:
        opt = optimizer(pr.params)
        before = [torch.empty_like(p) for p in pr.params]

        @torch.compile
        def step() -> None:
            if update:
                torch._foreach_copy_(before, pr.params)
                opt.step()
                torch._foreach_sub_(pr.params, before)
                torch._foreach_mul_(pr.params, pr.factors)
                torch._foreach_add_(pr.params, before)
            else:
                torch._foreach_mul_(pr.grads, pr.factors)
                opt.step()

        return step

    return build


def _fused(cls: type, **kwargs: object) -> Callable[[Problem], Callable]:
    def build(pr: Problem) -> Callable[[], None]:
        return cls(pr.params, spg=pr.spg, **kwargs).step

    return build


def _plain(
    optimizer: Callable[[list[Tensor]], torch.optim.Optimizer],
) -> Callable[[Problem], Callable]:
    def build(pr: Problem) -> Callable[[], None]:
        return optimizer(pr.params).step

    return build


def _importance_with(fn: Callable) -> Callable[[Problem], Callable]:
    def build(pr: Problem) -> Callable[[], None]:
        return lambda: fn(pr.keeps, pr.grads)

    return build


def _spg_importance(pr: Problem) -> Callable[[], None]:
    ops = resolve_backend(
        "auto",
        list(zip(map(str, range(len(pr.params))), pr.params, strict=True)),
        pr.spg.importance_dtype,
    )
    return lambda: ops.accumulate_(pr.keeps, pr.grads)


def _optimizer_competitors(
    ours: type, theirs: type, kwargs: dict, update: bool
) -> dict[str, Callable[[Problem], Callable]]:
    """spg-fast's fused masked step against SPG's mask around torch's foreach and fused steps, the
    compiled masked step, and torch's unmasked steps (the cost of the mask itself); ``update``: the
    mode ``mask="auto"`` picks for this optimizer."""
    return {
        "spg-fast fused": _fused(ours, **kwargs),
        "mask + torch foreach": _masked_then(lambda p: theirs(p, foreach=True, **kwargs)),
        "mask + torch fused": _masked_then(lambda p: theirs(p, fused=True, **kwargs)),
        "torch.compile(mask + step)": _compiled_masked(
            lambda p: theirs(p, foreach=True, **kwargs), update
        ),
        "unmasked torch fused": _plain(lambda p: theirs(p, fused=True, **kwargs)),
        "unmasked torch foreach": _plain(lambda p: theirs(p, foreach=True, **kwargs)),
    }


SGD = dict(lr=1e-3, momentum=0.9)
ADAMW = dict(lr=1e-3, weight_decay=1e-2)

IMPLEMENTATIONS: dict[str, dict[str, Callable[[Problem], Callable[[], object]]]] = {
    "mask": {
        "spg-fast": lambda pr: lambda: pr.spg.mask_gradients(pr.params),
        "eager loop": _eager_mask,
        "torch._foreach_mul_": lambda pr: lambda: torch._foreach_mul_(pr.grads, pr.factors),
        "torch.compile": lambda pr: torch.compile(_eager_mask(pr)),
    },
    "sgd_momentum_masked": _optimizer_competitors(
        spg_fast.optim.SGD, torch.optim.SGD, SGD, update=False
    ),
    "adamw_masked": _optimizer_competitors(
        spg_fast.optim.AdamW, torch.optim.AdamW, ADAMW, update=True
    ),
    "importance": {
        "spg-fast": _spg_importance,
        "reference": _importance_with(reference.accumulate_),
        "torch.compile(reference)": _importance_with(torch.compile(reference.accumulate_)),
    },
}

# Bytes-model entry for each benchmarked op (bench.bytes_model.STREAMS).
BYTES_OP = {
    "mask": "mask",
    "sgd_momentum_masked": "sgd_momentum_masked",
    "adamw_masked": "adamw_masked",
    "importance": "importance",
}
