"""How the native CPU kernels are launched: the tensor table of ``fused_steps.c``, built once for
fixed tensors, the checks that keep the C code memory-safe, and the call. The ops themselves are
``sgd_step``, ``adam_step`` and ``soft_mask``.

A ``Table`` is built for a launch's fixed tensors (parameters, stored keep factors, optimizer state,
step counts) and checked once; the one list that changes from call to call (the gradients, which
``zero_grad(set_to_none=True)`` replaces every step, or the values before a step) is re-pointed per
call, re-checked only when its pointers changed. ``keeps`` are the shared parameters' stored keep
factors (``spg_fast.storage``: float32, float64, bfloat16 or uint8), decoded by the C code.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch
from torch import Tensor

from spg_fast.kernels.cpu.build import load

DTYPES = {torch.float32: "f32", torch.float64: "f64"}
KEEP_DTYPES = {**DTYPES, torch.bfloat16: "bf16", torch.uint8: "u8"}
_LISTS = ("param", "grad", "factor", "buf1", "buf2", "buf3")


class _Tensors(ctypes.Structure):
    """``tensors_t`` of fused_steps.c: per tensor, its pointers (NULL where unused), size, Adam's
    step count and one auxiliary value."""

    _fields_ = [
        *((name, ctypes.POINTER(ctypes.c_void_p)) for name in _LISTS),
        ("step", ctypes.POINTER(ctypes.c_void_p)),
        ("numel", ctypes.POINTER(ctypes.c_int64)),
        ("aux", ctypes.POINTER(ctypes.c_double)),
        ("ntensors", ctypes.c_int64),
    ]


def problem(tensors: Sequence[Tensor], keeps: Sequence[Tensor] = ()) -> str | None:
    """Why these tensors (a launch's parameters, gradients and state, and the stored keep factors)
    cannot go to the native kernels, or None."""
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
    """The tensors' data pointers, padded with NULL to ``length`` (heads have no keep factor;
    unused state lists)."""
    return (ctypes.c_void_p * length)(*[t.data_ptr() for t in tensors])


class Table:
    """The C table of one launch over fixed tensors: ``params``, their stored ``keeps`` (the first
    ``len(keeps)`` parameters are shared, the rest heads), up to three ``buffers`` lists (optimizer
    state, one tensor per parameter each, or empty) and Adam's float32 ``steps`` (or empty). The
    ``grad`` list is set per call by ``point``. Raises ``ValueError`` naming what the C code
    cannot take."""

    def __init__(
        self,
        what: str,
        params: Sequence[Tensor],
        keeps: Sequence[Tensor],
        buffers: Sequence[Sequence[Tensor]] = (),
        steps: Sequence[Tensor] = (),
    ) -> None:
        n = len(params)
        self._what = what
        self._sizes = [p.numel() for p in params]
        if len(keeps) > n or any(len(b) not in (0, n) for b in buffers) or len(steps) not in (0, n):
            given = ", ".join(str(len(b)) for b in buffers)
            raise ValueError(
                f"{what}: {n} parameters take at most {n} keep factors and {n} or no tensors per "
                f"state list and step counts; got {len(keeps)} keep factors, state lists of "
                f"{given or 'none'} and {len(steps)} step counts"
            )
        for tensors in (keeps, *buffers):
            self._check_sizes(tensors, params)
        reason = problem([*params, *(t for b in buffers for t in b)], keeps)
        if reason is None and any(s.dtype != torch.float32 or not s.is_cpu for s in steps):
            reason = "Adam's step counts must be float32 CPU tensors"
        if reason:
            raise ValueError(f"{what}: {reason}")
        self.dtype = params[0].dtype if params else torch.float32
        self.keep_dtype = keeps[0].dtype if keeps else self.dtype
        self._library = load()
        self._functions: dict[str, ctypes._CFuncPtr] = {}
        self._params = list(params)
        self._held = [list(keeps), *(list(b) for b in buffers), list(steps)]  # kept alive
        slots = [*buffers, [], [], []][:3]
        self._grads = _pointers([], n)
        self._grad_pointers: list[int] = []
        self._target_pointers = [p.data_ptr() for p in params]
        self._aux = (ctypes.c_double * n)()
        self._param_array = _pointers(params, n)
        self.table = _Tensors(
            self._param_array,
            self._grads,
            _pointers(keeps, n),
            *(_pointers(b, n) for b in slots),
            _pointers(steps, n),
            (ctypes.c_int64 * n)(*self._sizes),
            self._aux,
            n,
        )

    def _check_sizes(self, tensors: Sequence[Tensor], params: Sequence[Tensor]) -> None:
        for t, p in zip(tensors, params, strict=False):
            if t.numel() != p.numel():
                raise ValueError(
                    f"{self._what}: a tensor of shape {tuple(t.shape)} goes with a parameter of "
                    f"shape {tuple(p.shape)}"
                )

    def point(self, grads: Sequence[Tensor]) -> None:
        """Set the per-call list (the gradients, or the values before a step), checked when any of
        its pointers changed since the last call."""
        pointers = [g.data_ptr() for g in grads]
        if pointers == self._grad_pointers:
            return
        if len(grads) != len(self._params):
            raise ValueError(
                f"{self._what}: {len(self._params)} parameters take {len(self._params)} "
                f"gradients, got {len(grads)}"
            )
        self._check_sizes(grads, self._params)
        reason = problem([*self._params[:1], *grads])
        if reason:
            raise ValueError(f"{self._what}: {reason}")
        self._grads[:] = pointers
        self._grad_pointers = pointers

    def retarget(self, targets: Sequence[Tensor]) -> None:
        """Point the table's main list at ``targets`` (laid out as the tensors it was built for):
        the soft mask of gradients masks this call's gradients in place."""
        pointers = [t.data_ptr() for t in targets]
        if pointers == self._target_pointers:
            return
        self._check_sizes(targets, self._params)
        reason = problem([*self._params[:1], *targets])
        if reason:
            raise ValueError(f"{self._what}: {reason}")
        self._param_array[: len(pointers)] = pointers
        self._target_pointers = pointers

    def set_aux(self, values: Sequence[float]) -> None:
        """The per-tensor auxiliary values (SGD's first-step flags)."""
        self._aux[:] = [float(v) for v in values]

    def real(self, value: float) -> ctypes.c_float | ctypes.c_double:
        """``value`` as the parameters' C floating type (the ``T`` of the C signatures)."""
        return (ctypes.c_float if self.dtype == torch.float32 else ctypes.c_double)(value)

    def call(self, kind: str, *args: ctypes._SimpleCData) -> None:
        """``spg_<kind>_<dtype>_<keep dtype>(table, args..., threads)``."""
        function = self._functions.get(kind)
        if function is None:
            suffix = f"{DTYPES[self.dtype]}_{KEEP_DTYPES[self.keep_dtype]}"
            function = self._functions[kind] = getattr(self._library, f"spg_{kind}_{suffix}")
        function(self.table, *args, ctypes.c_int(torch.get_num_threads()))


def scalars(scale: Tensor | None, grad_scale: Tensor | None, maximize: bool) -> tuple[float, float]:
    """The head scale (1 without a mask) and the factor the gradient is multiplied by: GradScaler
    unscales by multiplying with the float32 reciprocal of its scale, and so does the C code (exact
    for its power-of-two scales); maximizing negates it, which negates the product exactly. One
    host read each, free on the CPU."""
    head = 1.0 if scale is None else float(scale)
    inverse = 1.0 if grad_scale is None else float(grad_scale.double().reciprocal().float())
    return head, -inverse if maximize else inverse
