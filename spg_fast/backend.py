"""The one place that chooses which implementation of SPG's tensor operations runs.

``"torch"`` is the pure-PyTorch reference (any device, any floating dtype). ``"triton"`` runs the kernels of
``spg_fast.kernels`` on CUDA tensors, or on CPU tensors under Triton's interpreter when ``TRITON_INTERPRET=1`` is
set (how CI tests them). ``"auto"`` picks Triton for CUDA tensors of supported dtypes when Triton is installed,
the reference otherwise; both compute the same results (see the kernels' parity tests).

``spg_fast.optim``'s steps are chosen here too (``fused_steps``): the Triton kernels on the triton backend; on the
torch backend, the native CPU kernels of ``spg_fast.cpu`` for contiguous float32/float64 CPU tensors (built with
the system C compiler on first use; ``SPG_FAST_NATIVE=0`` turns them off, ``=1`` makes a failed build an error),
and otherwise "mask ``.grad``, then torch's fused step". All three compute the same update up to float rounding.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

from spg_fast import reference

BACKENDS = ("auto", "torch", "triton")
NATIVE_SETTINGS = ("auto", "0", "1")
TRITON_GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TRITON_IMPORTANCE_DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class Ops:
    """SPG's tensor operations as one backend implements them (signatures as in ``spg_fast.reference``).

    ``mask_factors(importances)`` gives, per shared tensor, what ``soft_mask_`` multiplies by: the keep factor
    ``1 - A`` for the reference, ``A`` itself for the kernels (which form ``1 - A`` in registers).
    """

    name: str
    importance_max_: Callable[[Sequence[Tensor], Sequence[Tensor]], Tensor]
    mask_factors: Callable[[Sequence[Tensor]], list[Tensor]]
    head_scale: Callable[[Sequence[Tensor]], Tensor]
    soft_mask_: Callable[[Sequence[Tensor], Sequence[Tensor], Sequence[Tensor], Tensor], None]


TORCH_OPS = Ops(
    name="torch",
    importance_max_=reference.importance_max_,
    mask_factors=reference.keep_factors,
    head_scale=reference.head_scale,
    soft_mask_=reference.soft_mask_,
)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_ops() -> Ops:
    from spg_fast.kernels import importance_max_, soft_mask_

    return Ops(name="triton", importance_max_=importance_max_, mask_factors=list,
               head_scale=reference.head_scale, soft_mask_=soft_mask_)


def _triton_problem(named: Iterable[tuple[str, Tensor]], importance_dtype: torch.dtype | None) -> str | None:
    """Why the kernels cannot serve these parameters, or None when they can."""
    if not triton_available():
        return "Triton is not installed"
    if importance_dtype is not None and importance_dtype not in TRITON_IMPORTANCE_DTYPES:
        return f"importance_dtype {importance_dtype} is not one of {TRITON_IMPORTANCE_DTYPES}"
    for name, p in named:
        if p.dtype not in TRITON_GRAD_DTYPES:
            return f"parameter {name!r} has dtype {p.dtype}; the kernels take {TRITON_GRAD_DTYPES}"
        if p.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return f"parameter {name!r} is on the CPU, where Triton runs only with TRITON_INTERPRET=1"
        if p.device.type not in ("cpu", "cuda"):
            return f"parameter {name!r} is on {p.device}; the kernels run on CUDA"
    return None


def resolve_backend(backend: str, named_params: Sequence[tuple[str, Tensor]],
                    importance_dtype: torch.dtype | None = None) -> Ops:
    """The ops for ``backend`` (one of ``BACKENDS``) serving ``named_params``.

    An explicit ``"triton"`` that cannot serve them is an error naming the reason; ``"auto"`` then uses the
    reference, which computes the same values.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return TORCH_OPS
    problem = _triton_problem(named_params, importance_dtype)
    if backend == "triton":
        if problem:
            raise ValueError(f"backend='triton' cannot be used: {problem}")
        return _triton_ops()
    on_cuda = all(p.device.type == "cuda" for _, p in named_params)
    return _triton_ops() if on_cuda and problem is None else TORCH_OPS


@functools.cache
def _native_build_problem() -> str | None:
    """Why the native CPU kernels cannot be built here (None: built and loaded); tried once per process."""
    from spg_fast.cpu.build import NativeBuildError, load

    try:
        load()
    except NativeBuildError as error:
        if os.environ.get("SPG_FAST_NATIVE") == "1":
            raise
        warnings.warn(f"spg_fast: the native CPU optimizer steps are unavailable ({error}); spg_fast.optim masks "
                      ".grad and runs torch's fused step instead, the same update up to float rounding",
                      RuntimeWarning, stacklevel=3)
        return str(error)
    return None


def fused_steps(backend: str, tensors: Sequence[Tensor]) -> ModuleType | None:
    """The module whose ``sgd_step_``/``adam_step_`` update a batch of ``spg_fast.optim`` on the SPG ``backend``
    (its name), given every tensor the step touches; None: mask ``.grad``, then torch's fused step."""
    if backend == "triton":
        from spg_fast.kernels import optimizer_steps

        return optimizer_steps
    setting = os.environ.get("SPG_FAST_NATIVE", "auto")
    if setting not in NATIVE_SETTINGS:
        raise ValueError(f"SPG_FAST_NATIVE={setting!r} is not one of {', '.join(NATIVE_SETTINGS)}")
    from spg_fast.cpu import steps

    if setting == "0" or steps.problem(tensors) is not None or _native_build_problem() is not None:
        return None
    return steps
