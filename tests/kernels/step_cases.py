"""Shared inputs and float64 oracles for the masked optimizer-step kernels (``test_sgd_step``,
``test_adam_step``): each implementation, reading stored keep factors in every format, against
torch's fused optimizer run in float64. Gradient mode: torch's step on the masked gradient. Update
mode: torch's step on the unmasked gradient, then the change it made scaled by the keep factor."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

import pytest
import torch

from tests.kernels.common import KEEP_DTYPES, keep64, random_keeps

# Odd sizes, one-element and zero-size tensors, and the Triton kernels' 1024-element tiles
# straddled; the native steps also get one tensor big enough (> 32768 elements in all) that they are
# cut into per-thread slices that start inside tensors (too slow for Triton's interpreter, and
# nothing it would test there).
SHAPES = [(7, 3), (0,), (1,), (2051,), (5, 0), (1023,), (3, 700)]
NATIVE_SHAPES = [*SHAPES[:3], (40001,), *SHAPES[4:]]
N_SHARED = 4
CUDA = torch.device("cuda")
MODES = {"gradient": False, "update": True}


@dataclass(frozen=True)
class Impl:
    """One implementation of the step ops: where it runs, its parameter dtypes and the stored keep
    formats it reads."""

    name: str
    device: torch.device
    dtypes: tuple[torch.dtype, ...]
    keep_dtypes: tuple[torch.dtype, ...]
    shapes: list[tuple[int, ...]]

    def ops(self, op: str) -> ModuleType:
        return importlib.import_module(
            f"spg_fast.kernels.{'triton' if self.name == 'triton' else 'cpu'}.{op}"
        )


IMPLS = {
    "triton": Impl(
        "triton",
        CUDA if torch.cuda.is_available() else torch.device("cpu"),
        (torch.float32, torch.bfloat16, torch.float16),
        tuple(KEEP_DTYPES),
        SHAPES,
    ),
    "native": Impl(
        "native",
        torch.device("cpu"),
        (torch.float32, torch.float64),
        (torch.float32, torch.float64, torch.bfloat16, torch.uint8),
        NATIVE_SHAPES,
    ),
}


def _short(dtype: torch.dtype) -> str:
    return str(dtype)[6:]


def cases(n_configs: int) -> list:
    """Every (implementation, parameter dtype, stored keep dtype, mode), each with one of
    ``n_configs`` optimizer configurations by rotation, so that every configuration meets both
    modes and several keep formats without the full product (Triton's interpreter is slow)."""
    out = []
    for impl in IMPLS.values():
        combos = [
            (dtype, keep, mode)
            for dtype in impl.dtypes
            for keep in impl.keep_dtypes
            for mode in MODES
        ]
        for i, (dtype, keep, mode) in enumerate(combos):
            config = (i + i // 2) % n_configs
            name = f"{impl.name}-{_short(dtype)}-keep_{_short(keep)}-{mode}"
            out.append(pytest.param(impl, dtype, keep, MODES[mode], config, id=name))
    return out


# Allowed error of one step against the float64 oracle (``relative_error``: relative to
# 1 + |value| + |value before the step|, the scale of the operands whose roundings make the error;
# relative to 1 + |value| alone a momentum buffer whose two terms cancel showed 2.75e-7), in both
# modes and for every keep format (the oracle decodes the same stored keep factors). Measured over
# every case here: float32 at most 9.9e-8 against the float64 oracle and 1.15e-7 against torch's
# float32 step (about one ulp); allowed two ulps (2**-22). float64 at most 1.9e-16 (0.85 ulp: the
# kernels round the masked gradient or the scaled change once more than torch's float64 step);
# allowed 4 ulps for compilers that contract to FMA differently. bfloat16/float16: the kernels
# round parameters and state once to the storage dtype (torch's step in float64 does not round):
# at most half an ulp of the value, 2**-8 (bfloat16) and 2**-11 (float16) relative, plus the
# rounded state feeding the update (a few per cent of that); measured 2.6e-3 and 3.2e-4, about
# two thirds of the bound.
TOL = {
    torch.float32: 2.0**-22,
    torch.float64: 2.0**-50,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}


@dataclass
class Problem:
    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    keeps: list[torch.Tensor]
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

    def keeps64(self) -> list[torch.Tensor]:
        """Each parameter's keep factor in float64 on the CPU: the decoded stored one of a shared
        tensor, the head scale of a head."""
        shared = [keep64(k.cpu()) for k in self.keeps]
        scale = self.head_scale.double().cpu()
        return shared + [scale.expand(p.shape) for p in self.params[len(shared) :]]

    def grads64(self, update: bool) -> list[torch.Tensor]:
        """The unscaled gradients in float64 as torch's optimizer sees them: masked in gradient
        mode, as they are in update mode."""
        unscale = 1.0 if self.grad_scale is None else self.grad_scale.double().cpu()
        out = [g.double().cpu() / unscale for g in self.grads]
        if update:
            return out
        return [g * k for g, k in zip(out, self.keeps64(), strict=True)]

    def masked_change(self, before: list[torch.Tensor], after: list[torch.Tensor]) -> None:
        """Update mode in float64: ``after <- before + keep * (after - before)`` in place."""
        for b, a, k in zip(before, after, self.keeps64(), strict=True):
            a.copy_(b + k * (a - b))


def problem(
    impl: Impl,
    dtype: torch.dtype,
    seed: int,
    grad_scale: float | None = None,
    keep_dtype: torch.dtype = torch.float32,
) -> Problem:
    """Random parameters, gradients, stored keep factors of the shared ones (``keep_dtype``; the
    special values 0, 1, tiny and subnormal among them), a head scale and GradScaler's scale."""
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
    case.keeps = [
        random_keeps(s, keep_dtype, gen, device=impl.device) for s in impl.shapes[:N_SHARED]
    ]
    return case


def copies64(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Float64 copies on the CPU (never the tensors themselves, even when they are float64 CPU
    tensors already: an oracle stepping an alias would step the kernel's input)."""
    return [t.detach().to("cpu", torch.float64, copy=True) for t in tensors]


def relative_error(
    ours: list[torch.Tensor], oracle: list[torch.Tensor], before: list[torch.Tensor]
) -> float:
    """The largest ``|ours - oracle| / (1 + |oracle| + |before|)`` over the lists: the error
    relative to the operands' scale (a step adds a term to the value ``before`` it; where the two
    cancel, their rounding errors are still of their own size)."""
    worst = 0.0
    for a, b, c in zip(ours, oracle, before, strict=True):
        if a.numel():
            b, c = b.to("cpu", torch.float64), c.to("cpu", torch.float64)
            worst = max(
                worst, float(((a.double().cpu() - b).abs() / (1 + b.abs() + c.abs())).max())
            )
    return worst


def assert_close(
    ours: list[torch.Tensor],
    oracle: list[torch.Tensor],
    before: list[torch.Tensor],
    dtype: torch.dtype,
) -> None:
    """``ours`` (the step's results, of ``dtype``) within ``TOL`` of the float64 ``oracle``,
    relative to the scale of the values and of their values ``before`` the step."""
    for a, b in zip(ours, oracle, strict=True):
        assert a.dtype == dtype and a.shape == b.shape
    error = relative_error(ours, oracle, before)
    assert error <= TOL[dtype], f"error {error:.3g} relative to the operands > {TOL[dtype]:.3g}"
