"""How the native CPU steps are launched: the tensor table of ``fused_steps.c``, the checks that
keep the C code memory-safe, and the call. The ops themselves are ``sgd_step`` and ``adam_step``.

The torch backend's mask factors are keep factors ``1 - A`` (``spg_fast._backend.Ops``), so here
``factors`` are multiplied in as they are. ``.grad`` is read, never written.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch
from torch import Tensor

from spg_fast.kernels.cpu.build import load

DTYPES = {torch.float32: "f32", torch.float64: "f64"}


class _Tensors(ctypes.Structure):
    """``tensors_t`` of fused_steps.c: per tensor, its pointers (NULL where unused), size and one
    auxiliary value."""

    _fields_ = [
        *(
            (name, ctypes.POINTER(ctypes.c_void_p))
            for name in ("param", "grad", "factor", "buf1", "buf2", "buf3")
        ),
        ("numel", ctypes.POINTER(ctypes.c_int64)),
        ("aux", ctypes.POINTER(ctypes.c_double)),
        ("ntensors", ctypes.c_int64),
    ]


def problem(tensors: Sequence[Tensor]) -> str | None:
    """Why these tensors (a step's parameters, gradients, factors and state) cannot go to the
    native steps."""
    dtype = tensors[0].dtype if tensors else None
    subclass = next((t for t in tensors if type(t) not in (Tensor, torch.nn.Parameter)), None)
    if subclass is not None:
        return (
            f"a tensor of shape {tuple(subclass.shape)} is a {type(subclass).__name__}, "
            "not a plain tensor"
        )
    if dtype not in DTYPES:
        return f"dtype {dtype} is not one of {tuple(DTYPES)}"
    for t in tensors:
        if t.is_cpu and t.dtype == dtype and t.is_contiguous():
            continue
        where = f"a tensor of shape {tuple(t.shape)}"
        if not t.is_cpu:
            return f"{where} is on {t.device}, not the CPU"
        if t.dtype != dtype:
            return f"{where} is {t.dtype} where the first is {dtype}"
        return f"{where} is not contiguous"
    return None


def _pointers(tensors: Sequence[Tensor], length: int) -> ctypes.Array:
    """The tensors' data pointers, padded with NULL to ``length`` (heads have no factor; unused
    state lists)."""
    return (ctypes.c_void_p * length)(*[t.data_ptr() for t in tensors])


def launch(
    kind: str,
    params: list[Tensor],
    grads: list[Tensor],
    factors: list[Tensor],
    state: dict[str, tuple[list[Tensor], bool]],
    aux: list[float],
    scale: Tensor | None,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    maximize: bool,
    *hyper: float | ctypes.c_int,
) -> None:
    """Check the tensors, then run ``spg_<kind>_step_<dtype>`` over them. ``state`` maps each state
    list (at most three, in the C order) to its tensors and whether this configuration uses it (then
    one per parameter, else none); ``hyper`` follows the C signature."""
    n = len(params)
    buffers = [tensors for tensors, _ in state.values()]
    expected = [n if used else 0 for _, used in state.values()]
    if len(grads) != n or len(factors) > n or [len(b) for b in buffers] != expected:
        given = ", ".join(f"{len(b)} {name}" for name, b in zip(state, buffers, strict=True))
        wanted = ", ".join(f"{e} {name}" for name, e in zip(state, expected, strict=True))
        raise ValueError(
            f"{kind} step: {n} parameters take {n} gradients, at most {n} mask factors and "
            f"{wanted}; got {len(grads)} gradients, {len(factors)} mask factors and {given}"
        )
    if not params or (found_inf is not None and found_inf.item() != 0):
        return
    sizes = [p.numel() for p in params]
    for tensors in (grads, factors, *buffers):
        if [t.numel() for t in tensors] != sizes[: len(tensors)]:
            t, p = next(
                (t, p) for t, p in zip(tensors, params, strict=False) if t.numel() != p.numel()
            )
            raise ValueError(
                f"{kind} step: a tensor of shape {tuple(t.shape)} goes with a parameter of shape "
                f"{tuple(p.shape)}"
            )
    reason = problem([*params, *grads, *factors, *(t for b in buffers for t in b)])
    if reason:
        raise ValueError(f"{kind} step: {reason}")
    slots = [*buffers, [], []][:3]
    table = _Tensors(
        _pointers(params, n),
        _pointers(grads, n),
        _pointers(factors, n),
        *(_pointers(b, n) for b in slots),
        (ctypes.c_int64 * n)(*sizes),
        (ctypes.c_double * n)(*aux),
        n,
    )
    real = ctypes.c_float if params[0].dtype == torch.float32 else ctypes.c_double
    head = 1.0 if scale is None else float(scale)
    # GradScaler unscales by multiplying with the float32 reciprocal of its scale; so do we (exact
    # for its power-of-two scales). Maximizing negates it, which negates the product exactly.
    inverse = 1.0 if grad_scale is None else float(grad_scale.double().reciprocal().float())
    unscale = -inverse if maximize else inverse
    values = [real(h) if isinstance(h, float) else h for h in hyper]
    function = getattr(load(), f"spg_{kind}_step_{DTYPES[params[0].dtype]}")
    function(table, real(head), real(unscale), *values, ctypes.c_int(torch.get_num_threads()))
