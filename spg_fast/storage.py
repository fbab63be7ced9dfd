"""How SPG stores the accumulated importance: the keep factor ``1 - A`` in one of four formats.

SPG keeps, per shared element, the factor its gradient or update is multiplied by, ``k = 1 - A``,
rather than ``A`` itself: storing ``A`` rounds the small keep factors of important elements to 0
(bfloat16 ``A`` is exactly 1.0 from ``|z| = 3.47`` on), which freezes them for good, while a
rounded ``k`` keeps its relative precision down to tiny values. Every kernel reads the stored value
and decodes it in registers; nothing else is held per element.

The float32 keep factor is the reference: ``1 - |tanh(z)|`` formed in float64 as ``2e / (1 + e)``
with ``e = exp(-2|z|)`` and rounded once to float32, but never to 0: ``tanh`` of a finite value is
below 1, so SPG freezes nothing outright, and a keep factor below float32's smallest positive value
(``|z|`` above about 52.0, which a tensor of more than about 2,700 elements can reach) is stored as
that value, ``2**-149`` (float64: ``2**-1074``). The formats (``importance_dtype``):

- ``torch.float32`` (the default; ``torch.float64`` for float64 parameters): that value itself.
- ``torch.bfloat16``: the float32 keep rounded to nearest even (relative error at most ``2**-8``);
  a keep factor above 0 never rounds to 0 (bfloat16 shares float32's exponent range, and a float32
  subnormal that would round to 0 is stored as the smallest bfloat16 instead).
- ``torch.uint8`` ("E5M3"): 0 stands for a keep of exactly 0; a code ``c`` in 1..255 for the float32
  whose bits are ``(c + 761) << 20``: 3 mantissa bits over 32 binades, ``c = 255`` is 1.0 and
  ``c = 1`` is ``1.25 * 2**-32``. Encoding rounds the float32 bits to the nearest code (ties away
  from zero), clamped to 1..255 for a positive keep: relative error at most ``1/16`` for every keep
  from ``2**-31`` to 1 (so in particular wherever the keep is at least ``1e-6``), and never 0 for a
  positive keep.

Each encoding is monotone in ``k``, so the accumulation ``A <- max(A, a)`` is exactly
``stored <- min(stored, encode(k))``: the stored value is always the encoding of the exact running
minimum of the float32 keep factors, with no drift from repeated rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor

# What ``importance_dtype`` may be: None picks float32 (float64 for float64 parameters).
IMPORTANCE_DTYPES = (None, torch.float32, torch.bfloat16, torch.uint8)
# Bound on |decode(encode(k)) - k| / k for the float32 keep k of each stored format (uint8: every
# k >= 2**-31; bfloat16: every normal k).
RELATIVE_ERROR = {
    torch.float64: 0.0,
    torch.float32: 0.0,
    torch.bfloat16: 2.0**-8,
    torch.uint8: 1 / 16,
}

# The smallest keep factor each keep dtype is rounded to (see the module docstring).
SMALLEST = {torch.float32: 2.0**-149, torch.float64: 2.0**-1074}
# The uint8 code c stands for the float32 with bits (c + _U8_OFFSET) << _U8_SHIFT.
_U8_SHIFT = 20
_U8_OFFSET = 761
_BF16_TINY = torch.tensor(1, dtype=torch.int16).view(torch.bfloat16)  # 2**-133, the smallest > 0


def check_importance_dtype(importance_dtype: torch.dtype | None) -> None:
    """Raise ``ValueError`` unless ``importance_dtype`` is one of ``IMPORTANCE_DTYPES``.

    Args:
        importance_dtype: the storage format asked for (None: the default).

    Raises:
        ValueError: ``importance_dtype`` is not one of ``IMPORTANCE_DTYPES``.
    """
    if importance_dtype not in IMPORTANCE_DTYPES:
        raise ValueError(
            "importance_dtype must be None, torch.float32, torch.bfloat16 or torch.uint8, got "
            f"{importance_dtype}"
        )


def stored_dtype(param_dtype: torch.dtype, importance_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a shared parameter of ``param_dtype`` keeps its importance in.

    Args:
        param_dtype: the shared parameter's dtype.
        importance_dtype: the storage format asked for, one of ``IMPORTANCE_DTYPES`` (not checked
            here); None: float32, or float64 for a float64 parameter.

    Returns:
        ``importance_dtype`` itself unless it is None.
    """
    if importance_dtype is not None:
        return importance_dtype
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def keep_dtype(stored: torch.dtype) -> torch.dtype:
    """The floating dtype a stored format decodes to: float64 for float64, float32 otherwise.

    Args:
        stored: the storage dtype.

    Returns:
        ``torch.float64`` or ``torch.float32``.
    """
    return torch.float64 if stored == torch.float64 else torch.float32


def encode(keep: Tensor, dtype: torch.dtype) -> Tensor:
    """The stored form in ``dtype`` of keep factors ``keep`` (values in [0, 1], floating point).

    Values are first rounded to float32 (to float64 for float64 storage), the reference keep
    factor, then encoded as the module docstring says.

    Args:
        keep: a tensor of any shape and device.
        dtype: the storage format: ``torch.float64``, ``torch.float32``, ``torch.bfloat16`` or
            ``torch.uint8``.

    Returns:
        A new tensor of ``keep``'s shape in ``dtype``, on ``keep``'s device.

    Raises:
        ValueError: ``dtype`` is none of the storage formats.
    """
    if dtype == torch.float64:
        return keep.to(torch.float64, copy=True)
    k = keep.to(torch.float32)
    if dtype == torch.float32:
        return k.clone() if k is keep else k
    if dtype == torch.bfloat16:
        out = k.to(torch.bfloat16)
        return torch.where((out == 0) & (k > 0), _BF16_TINY.to(k.device), out)
    if dtype == torch.uint8:
        code = (k.view(torch.int32) + (1 << (_U8_SHIFT - 1))).bitwise_right_shift(_U8_SHIFT)
        code = (code - _U8_OFFSET).clamp_(1, 255)
        return torch.where(k > 0, code, 0).to(torch.uint8)
    raise ValueError(f"no importance storage in {dtype}")


def decode(stored: Tensor) -> Tensor:
    """The keep factors ``stored`` stands for, in ``keep_dtype(stored.dtype)`` (a new tensor, or
    ``stored`` itself for float32 and float64 storage).

    Args:
        stored: stored keep factors in float64, float32, bfloat16 or uint8.

    Returns:
        A tensor of ``stored``'s shape on its device.

    Raises:
        ValueError: ``stored.dtype`` is none of the storage formats.
    """
    if stored.dtype in (torch.float32, torch.float64):
        return stored
    if stored.dtype == torch.bfloat16:
        return stored.to(torch.float32)
    if stored.dtype == torch.uint8:
        bits = (stored.to(torch.int32) + _U8_OFFSET).bitwise_left_shift_(_U8_SHIFT)
        return bits.view(torch.float32).masked_fill_(stored == 0, 0.0)
    raise ValueError(f"no importance storage in {stored.dtype}")


def fresh(shape: torch.Size | tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Stored keep factors of 1 (no importance yet) of ``shape``.

    Args:
        shape: the shape of the tensor.
        dtype: the storage format (as for ``encode``).
        device: where the tensor is made.

    Returns:
        A new contiguous tensor of ``shape`` in ``dtype`` on ``device``, every element
            ``encode(1.0)`` (uint8: the code 255).

    Raises:
        ValueError: ``dtype`` is none of the storage formats.
    """
    one = encode(torch.ones((), device=device), dtype)
    return one.expand(shape).clone(memory_format=torch.contiguous_format)
