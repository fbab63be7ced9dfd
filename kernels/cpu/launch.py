"""How the native CPU steps are launched: the tensor table of ``fused_steps.c``, the checks that
keep the C code memory-safe, and the call. The ops themselves are ``sgd_step`` and ``adam_step``.

``keeps`` are the shared parameters' stored keep factors (``spg_fast.storage``: float32, float64,
bfloat16 or uint8), decoded by the C code. ``.grad`` is read, never written.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch
from torch import Tensor

from spg_fast.kernels.cpu.build import load

DTYPES = {torch.float32: "f32", torch.float64: "f64"}
KEEP_DTYPES = {**DTYPES, torch.bfloat16: "bf16", torch.uint8: "u8"}


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


def problem(tensors: Sequence[Tensor], keeps: Sequence[Tensor] = ()) -> str | None:
    """Why these tensors (a step's parameters, gradients and state, and the stored keep factors)
    cannot go to the native steps."""
    dtype = tensors[0].dtype if tensors else None
    bad_keep = next((k for k in keeps if k.dtype not in KEEP_DTYPES), None)
    if bad_keep is not None:
        return f"keep factors in {bad_keep.dtype} are not one of {tuple(KEEP_DTYPES)}"
    if len({k.dtype for k in keeps}) > 1:
        return "the keep factors are not all of one dtype"
    subclass = next(
        (t for t in (*tensors, *keeps) if type(t) not in (Tensor, torch.nn.Parameter)), None
    )
    if subclass is not None:
        return (
            f"a tensor of shape {tuple(subclass.shape)} is a {type(subclass).__name__}, "
            "not a plain tensor"
        )
    if dtype not in DTYPES:
        return f"dtype {dtype} is not one of {tuple(DTYPES)}"
    for t in (*tensors, *keeps):
        where = f"a tensor of shape {tuple(t.shape)}"
        if not t.is_cpu:
            return f"{where} is on {t.device}, not the CPU"
        if not t.is_contiguous():
            return f"{where} is not contiguous"
    mismatched = next((t for t in tensors if t.dtype != dtype), None)
    if mismatched is not None:
        shape = tuple(mismatched.shape)
        return f"a tensor of shape {shape} is {mismatched.dtype} where the first is {dtype}"
    return None


def _pointers(tensors: Sequence[Tensor], length: int) -> ctypes.Array:
    """The tensors' data pointers, padded with NULL to ``length`` (heads have no factor; unused
    state lists)."""
    return (ctypes.c_void_p * length)(*[t.data_ptr() for t in tensors])


def launch(
    kind: str,
    params: list[Tensor],
    grads: list[Tensor],
    keeps: list[Tensor],
    state: dict[str, tuple[list[Tensor], bool]],
    aux: list[float],
    scale: Tensor | None,
    update: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    maximize: bool,
    *hyper: float | ctypes.c_int,
) -> None:
    """Check the tensors, then run ``spg_<kind>_step_<dtype>_<keep dtype>`` over them. ``state``
    maps each state list (at most three, in the C order) to its tensors and whether this
    configuration uses it (then one per parameter, else none); ``update``: mask the update rather
    than the gradient (once there is a mask: ``scale`` not None); ``hyper`` follows the C
    signature after the update flag."""
    n = len(params)
    buffers = [tensors for tensors, _ in state.values()]
    expected = [n if used else 0 for _, used in state.values()]
    if len(grads) != n or len(keeps) > n or [len(b) for b in buffers] != expected:
        given = ", ".join(f"{len(b)} {name}" for name, b in zip(state, buffers, strict=True))
        wanted = ", ".join(f"{e} {name}" for name, e in zip(state, expected, strict=True))
        raise ValueError(
            f"{kind} step: {n} parameters take {n} gradients, at most {n} keep factors and "
            f"{wanted}; got {len(grads)} gradients, {len(keeps)} keep factors and {given}"
        )
    if not params or (found_inf is not None and found_inf.item() != 0):
        return
    sizes = [p.numel() for p in params]
    for tensors in (grads, keeps, *buffers):
        if [t.numel() for t in tensors] != sizes[: len(tensors)]:
            t, p = next(
                (t, p) for t, p in zip(tensors, params, strict=False) if t.numel() != p.numel()
            )
            raise ValueError(
                f"{kind} step: a tensor of shape {tuple(t.shape)} goes with a parameter of shape "
                f"{tuple(p.shape)}"
            )
    reason = problem([*params, *grads, *(t for b in buffers for t in b)], keeps)
    if reason:
        raise ValueError(f"{kind} step: {reason}")
    slots = [*buffers, [], []][:3]
    table = _Tensors(
        _pointers(params, n),
        _pointers(grads, n),
        _pointers(keeps, n),
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
    keep_dtype = keeps[0].dtype if keeps else params[0].dtype
    function = getattr(
        load(), f"spg_{kind}_step_{DTYPES[params[0].dtype]}_{KEEP_DTYPES[keep_dtype]}"
    )
    masks_update = ctypes.c_int(update and scale is not None)
    threads = ctypes.c_int(torch.get_num_threads())
    function(table, real(head), real(unscale), masks_update, *values, threads)
