"""Shared inputs and float64 oracles for the masked optimizer-step kernels (``test_sgd_step``,
``test_adam_step``): each implementation against torch's fused optimizer run in float64 on the
masked gradient."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

import pytest
import torch

from spg_fast import reference

# Odd sizes, one-element and zero-size tensors, and the Triton kernels' 1024-element tiles
# straddled; the native steps also get one tensor big enough (> 32768 elements in all) that they are
# cut into per-thread slices that start inside tensors (too slow for Triton's interpreter, and
# nothing it would test there).
SHAPES = [(7, 3), (0,), (1,), (2051,), (5, 0), (1023,), (3, 700)]
NATIVE_SHAPES = [*SHAPES[:3], (40001,), *SHAPES[4:]]
N_SHARED = 4
CUDA = torch.device("cuda")


@dataclass(frozen=True)
class Impl:
    """One implementation of the step ops: where it runs, what it takes as mask factor,
    its dtypes."""

    name: str
    device: torch.device
    dtypes: tuple[torch.dtype, ...]
    reads_importance: (
        bool  # True: the kernel takes A and forms 1 - A itself; False: it takes the keep factor
    )
    shapes: list[tuple[int, ...]]

    def ops(self, op: str) -> ModuleType:
        return importlib.import_module(
            f"spg_fast.kernels.{'triton' if self.name == 'triton' else 'cpu'}.{op}"
        )

    def factors(self, importances: list[torch.Tensor]) -> list[torch.Tensor]:
        return importances if self.reads_importance else reference.keep_factors(importances)


IMPLS = {
    "triton": Impl(
        "triton",
        CUDA if torch.cuda.is_available() else torch.device("cpu"),
        (torch.float32, torch.bfloat16, torch.float16),
        True,
        SHAPES,
    ),
    "native": Impl(
        "native", torch.device("cpu"), (torch.float32, torch.float64), False, NATIVE_SHAPES
    ),
}
CASES = [
    pytest.param(impl, dtype, id=f"{impl.name}-{str(dtype)[6:]}")
    for impl in IMPLS.values()
    for dtype in impl.dtypes
]
# Allowed error of one step against the float64 oracle, relative to (1 + |value|). float32: the
# largest measured was 1.8e-7 (native) and 1.2e-7 (Triton), about one and a half ulps; float64
# measured bit-identical to torch's float64 fused kernels (same operation order), allowed 4 ulps for
# compilers that contract to FMA differently. bfloat16/float16: the kernels round parameters and
# state once to the storage dtype (torch rounds after every operation); allowed one ulp of the
# storage dtype, as the stored state feeds the update.
TOL = {
    torch.float32: 2.0**-22,
    torch.float64: 2.0**-50,
    torch.bfloat16: 2.0**-7,
    torch.float16: 2.0**-10,
}


@dataclass
class Problem:
    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    importances: list[torch.Tensor]
    head_scale: torch.Tensor
    grad_scale: torch.Tensor | None
    gen: torch.Generator
    impl: Impl
    dtype: torch.dtype

    def rand(
        self, shape: tuple[int, ...], positive: bool = False, scale: float = 1.0
    ) -> torch.Tensor:
        """Normal values times ``scale``; ``positive``: in [0.5, inf) times ``scale`` (second
        moments that stay normal numbers in float16, whose subnormals would measure the storage
        format, not the kernel)."""
        x = torch.randn(shape, generator=self.gen, dtype=torch.float64)
        return ((x.abs() + 0.5 if positive else x) * scale).to(self.dtype).to(self.impl.device)

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return self.impl.shapes

    @property
    def factors(self) -> list[torch.Tensor]:
        return self.impl.factors(self.importances)

    def masked64(self) -> list[torch.Tensor]:
        """The masked, unscaled gradients in float64: what torch's optimizer would see."""
        keeps = [k.double() for k in reference.keep_factors(self.importances)]
        unscale = 1.0 if self.grad_scale is None else self.grad_scale.double()
        out = [g.double() / unscale for g in self.grads]
        return [g * k for g, k in zip(out, keeps, strict=False)] + [
            g * self.head_scale.double() for g in out[len(keeps) :]
        ]


def problem(impl: Impl, dtype: torch.dtype, seed: int, grad_scale: float | None = None) -> Problem:
    """Random parameters, gradients, importances of the shared ones, a head scale and
    GradScaler's scale."""
    gen = torch.Generator().manual_seed(seed)
    case = Problem(
        [],
        [],
        [],
        torch.rand((), generator=gen).to(impl.device),
        None if grad_scale is None else torch.tensor(grad_scale, device=impl.device),
        gen,
        impl,
        dtype,
    )
    case.params = [case.rand(s) for s in impl.shapes]
    case.grads = [case.rand(s, scale=grad_scale or 1.0) for s in impl.shapes]
    importance_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    case.importances = [
        torch.rand(s, generator=gen, dtype=torch.float64).to(importance_dtype).to(impl.device)
        for s in impl.shapes[:N_SHARED]
    ]
    return case


def assert_close(ours: list[torch.Tensor], oracle: list[torch.Tensor], dtype: torch.dtype) -> None:
    for a, b in zip(ours, oracle, strict=True):
        b = b.to(a.device)
        torch.testing.assert_close(a.double(), b, rtol=TOL[dtype], atol=TOL[dtype])
