"""The one place that chooses which implementation of SPG's tensor operations runs, optimizer
steps included.

``"torch"`` is the pure-PyTorch reference (any device, any floating dtype). ``"triton"`` runs the
Triton kernels of ``spg_fast.kernels.triton`` on CUDA tensors, or on CPU tensors under Triton's
interpreter when ``TRITON_INTERPRET=1`` is set (how CI tests them). ``"auto"`` picks Triton for CUDA
tensors of supported dtypes when Triton is installed, the reference otherwise; both compute the same
results (see the kernels' parity tests).

``spg_fast.optim``'s fused steps come from the same ``Ops`` (``Ops.step_kernels``): the Triton
kernels on the triton backend; on the torch backend, the native CPU kernels of
``spg_fast.kernels.cpu`` for contiguous float32/float64 CPU tensors (built with the system C
compiler on first use; ``SPG_FAST_NATIVE=0`` turns them off, ``=1`` makes a failed build an error),
and otherwise none: the mask (of ``.grad``, or of the change) around torch's fused step. All three
compute the same update up to float rounding. The torch backend's soft mask and update mask also
run natively on such CPU tensors (one pass), and as the reference elsewhere.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from spg_fast import reference

BACKENDS = ("auto", "torch", "triton")
NATIVE_SETTINGS = ("auto", "0", "1")


class StepKernels(NamedTuple):
    """Fused masked optimizer steps, prepared for fixed tensors: ``sgd(params, keeps,
    momentum_buffers)`` and ``adam(params, keeps, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)``
    return a step called with each step's gradients (``spg_fast.kernels.triton.sgd_step.SGDStep``
    and ``adam_step.AdamStep``, or their native CPU twins); they read the stored keep factors
    (``spg_fast.storage``)."""

    sgd: Callable[..., Callable[..., None]]
    adam: Callable[..., Callable[..., None]]


@dataclass(frozen=True)
class Ops:
    """SPG's tensor operations as one backend implements them (signatures as in
    ``spg_fast.reference``). Every op takes the shared parameters' stored keep factors
    (``spg_fast.storage``) as they are stored.

    ``masker(xs, keeps, heads, before=None, head_before=None)`` prepares SPG's mask for fixed
    tensors (``spg_fast.kernels.triton.soft_mask.SoftMask``'s interface): called with each step's
    gradients it masks them; prepared with ``before`` it scales the change a step made. ``moments``
    (of a list of tensors, ``[n, 5]``) and ``accumulate_with_`` serve parameters sharded across
    processes (FSDP2), whose statistics are merged before the importance is formed; the Triton
    backend runs its own statistics kernels for them. ``head_scale`` is the reference's on both.
    ``step_kernels(tensors, keeps)`` gives the fused steps that serve a batch of ``spg_fast.optim``
    (every tensor the step touches, and the keep factors it reads), or None: the mask around
    torch's fused step.
    """

    name: str
    accumulate_: Callable[[Sequence[Tensor], Sequence[Tensor]], Tensor]
    masker: Callable[..., Callable[..., None]]
    step_kernels: Callable[[Sequence[Tensor], Sequence[Tensor]], StepKernels | None]
    head_scale: Callable[..., Tensor] = reference.head_scale
    moments: Callable[[Sequence[Tensor]], Tensor] = reference.moments_of
    accumulate_with_: Callable[[Sequence[Tensor], Sequence[Tensor], Tensor], Tensor] = (
        reference.accumulate_with_
    )


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _triton_ops() -> Ops:
    from spg_fast.kernels.triton.accumulate import accumulate_, accumulate_with_, moments
    from spg_fast.kernels.triton.adam_step import AdamStep
    from spg_fast.kernels.triton.sgd_step import SGDStep
    from spg_fast.kernels.triton.soft_mask import SoftMask

    steps = StepKernels(SGDStep, AdamStep)
    return Ops(
        name="triton",
        accumulate_=accumulate_,
        masker=SoftMask,
        step_kernels=lambda tensors, keeps: steps,
        moments=moments,
        accumulate_with_=accumulate_with_,
    )


@functools.cache
def _native_build_problem() -> str | None:
    """Why the native CPU kernels cannot be built here (None: built and loaded); tried once
    per process."""
    from spg_fast.kernels.cpu.build import NativeBuildError, load

    try:
        load()
    except NativeBuildError as error:
        if os.environ.get("SPG_FAST_NATIVE") == "1":
            raise
        warnings.warn(
            f"spg_fast: the native CPU optimizer steps are unavailable ({error}); spg_fast.optim "
            "masks .grad and runs torch's fused step instead, the same update up to float rounding",
            RuntimeWarning,
            stacklevel=5,
        )
        return str(error)
    return None


def _native_allowed() -> bool:
    """Whether ``SPG_FAST_NATIVE`` lets the native CPU kernels run and they are built."""
    setting = os.environ.get("SPG_FAST_NATIVE", "auto")
    if setting not in NATIVE_SETTINGS:
        raise ValueError(f"SPG_FAST_NATIVE={setting!r} is not one of {', '.join(NATIVE_SETTINGS)}")
    return setting != "0" and _native_build_problem() is None


def _native_steps(tensors: Sequence[Tensor], keeps: Sequence[Tensor]) -> StepKernels | None:
    """The native CPU steps when they can serve ``tensors`` and the stored keep factors ``keeps``
    and ``SPG_FAST_NATIVE`` allows them, else None."""
    from spg_fast.kernels.cpu import adam_step, launch, sgd_step

    if launch.problem(tensors, keeps) is not None or not _native_allowed():
        return None
    return StepKernels(sgd_step.SGDStep, adam_step.AdamStep)


class _ReferenceMask:
    """The reference's soft mask with the interface of a prepared one (nothing to prepare)."""

    def __init__(
        self,
        xs: Sequence[Tensor],
        keeps: Sequence[Tensor],
        heads: Sequence[Tensor],
        before: Sequence[Tensor] | None = None,
        head_before: Sequence[Tensor] | None = None,
    ) -> None:
        self._args = (list(xs), list(keeps), list(heads), before, head_before)

    def __call__(
        self, grads: Sequence[Tensor] | None, head_grads: Sequence[Tensor] | None, scale: Tensor
    ) -> None:
        xs, keeps, heads, before, head_before = self._args
        if before is None:
            targets = (xs, heads) if grads is None else (grads, head_grads)
            reference.soft_mask_(targets[0], keeps, targets[1], scale)
        else:
            reference.scale_updates_(xs, before, keeps, heads, head_before, scale)


def _torch_masker(
    xs: Sequence[Tensor],
    keeps: Sequence[Tensor],
    heads: Sequence[Tensor],
    before: Sequence[Tensor] | None = None,
    head_before: Sequence[Tensor] | None = None,
) -> Callable[..., None]:
    """The torch backend's prepared mask: the native CPU kernel where it can serve the tensors (one
    pass, no temporary), else the reference."""
    from spg_fast.kernels.cpu import launch, soft_mask

    tensors = [*xs, *heads, *(before or ()), *(head_before or ())]
    if tensors and launch.problem(tensors, keeps) is None and _native_allowed():
        return soft_mask.SoftMask(xs, keeps, heads, before, head_before)
    return _ReferenceMask(xs, keeps, heads, before, head_before)


TORCH_OPS = Ops(
    name="torch",
    accumulate_=reference.accumulate_,
    masker=_torch_masker,
    step_kernels=_native_steps,
)


def _triton_problem(
    named: Iterable[tuple[str, Tensor]], importance_dtype: torch.dtype | None
) -> str | None:
    """Why the kernels cannot serve these parameters, or None when they can."""
    if not triton_available():
        return "Triton is not installed"
    from spg_fast.kernels.triton.dtypes import GRAD_DTYPES, KEEP_DTYPES

    if importance_dtype is not None and importance_dtype not in KEEP_DTYPES:
        return f"importance_dtype {importance_dtype} is not one of {KEEP_DTYPES}"
    for name, p in named:
        if p.dtype not in GRAD_DTYPES:
            return f"parameter {name!r} has dtype {p.dtype}; the kernels take {GRAD_DTYPES}"
        if p.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return (
                f"parameter {name!r} is on the CPU, where Triton runs only with TRITON_INTERPRET=1"
            )
        if p.device.type not in ("cpu", "cuda"):
            return f"parameter {name!r} is on {p.device}; the kernels run on CUDA"
    return None


def resolve_backend(
    backend: str,
    named_params: Sequence[tuple[str, Tensor]],
    importance_dtype: torch.dtype | None = None,
) -> Ops:
    """The ops for ``backend`` (one of ``BACKENDS``) serving ``named_params``.

    An explicit ``"triton"`` that cannot serve them is an error naming the reason; ``"auto"`` then
    uses the reference, which computes the same values.
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
