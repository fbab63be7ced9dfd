"""Inputs for the kernel parity tests: the device the kernels run on, random tensors in awkward
layouts, stored keep factors (``spg_fast.storage``) in every format, and their float64 values
written out independently of the library."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from spg_fast import storage

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GRAD_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# The stored keep formats the Triton kernels read (the native CPU steps also read float64).
KEEP_DTYPES = [torch.float32, torch.bfloat16, torch.uint8]
LAYOUTS = ["contiguous", "transposed", "strided", "offset"]
# Sizes straddling the kernels' 1024-element tiles, one-element and zero-size tensors.
SHAPES = [(1,), (2,), (7, 3), (1023,), (1025,), (3, 700), (0,), (0, 5)]
# Keep factors every format must carry through a kernel: exactly 0 and 1, tiny ones, float32
# subnormals (2**-149 the smallest), the smallest normal float32 and the smallest uint8 code's.
SPECIAL_KEEPS = [0.0, 1.0, 1e-30, 1e-40, 2.0**-149, 2.0**-126, 1.25 * 2.0**-32, 1e-6, 0.5]


def in_layout(
    make: Callable[[tuple[int, ...]], torch.Tensor], shape: tuple[int, ...], layout: str
) -> torch.Tensor:
    """A tensor of ``shape`` built by ``make`` (contiguous, on DEVICE) and viewed in ``layout``:
    contiguous; transposed (dense but permuted, like channels_last); strided (every other row of a
    larger tensor); offset (a view at a storage offset)."""
    if layout == "contiguous":
        return make(shape)
    if layout == "transposed":
        return make(shape[::-1]).permute(*reversed(range(len(shape))))
    if layout == "strided":
        return make((2 * shape[0], *shape[1:]))[::2]
    if layout == "offset":
        return make((shape[0] + 1, *shape[1:]))[1:]
    raise ValueError(layout)


def random_tensor(
    shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator, layout: str = "contiguous"
) -> torch.Tensor:
    """Random values with a random spread and offset on DEVICE, in ``layout`` (``in_layout``)."""
    scale = float(torch.rand((), generator=gen)) * 5 + 0.05
    offset = float(torch.randn((), generator=gen)) * 4

    def values(s: tuple[int, ...]) -> torch.Tensor:
        return (
            (torch.randn(s, generator=gen, dtype=torch.float64) * scale + offset)
            .to(dtype)
            .to(DEVICE)
        )

    return in_layout(values, shape, layout)


def keep_values(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Float64 keep factors in [0, 1]: SPECIAL_KEEPS first (as many as fit), then a third
    log-uniform in [1e-12, 1] (the small keeps of important elements), the rest uniform."""
    n = 1
    for s in shape:
        n *= s
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    log_uniform = 10.0 ** (-12 * torch.rand(n, generator=gen, dtype=torch.float64))
    k = torch.where(torch.rand(n, generator=gen, dtype=torch.float64) < 1 / 3, log_uniform, u)
    special = torch.tensor(SPECIAL_KEEPS, dtype=torch.float64)[:n]
    k[: special.numel()] = special
    return k.reshape(shape)


def random_keeps(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    gen: torch.Generator,
    layout: str = "contiguous",
    device: torch.device = DEVICE,
) -> torch.Tensor:
    """Stored keep factors of ``keep_values`` in the format ``dtype``, on ``device``, in
    ``layout``."""
    return in_layout(lambda s: storage.encode(keep_values(s, gen), dtype).to(device), shape, layout)


def keep64(stored: torch.Tensor) -> torch.Tensor:
    """The keep factors ``stored`` stands for, in float64, written out from the format's
    definition: uint8 code ``c > 0`` is the float32 with biased exponent ``(c + 761) >> 3`` and
    the top three mantissa bits ``(c + 761) & 7``; 0 is 0; floating formats are their value."""
    if stored.dtype != torch.uint8:
        return stored.double()
    c = stored.long() + 761
    value = torch.exp2((c >> 3).double() - 127) * (1 + (c & 7).double() / 8)
    return torch.where(stored == 0, 0.0, value)


def oracle_keep(h: torch.Tensor) -> torch.Tensor:
    """The spec's keep factor ``1 - |tanh(standardize(h))|`` in float64, written independently of
    the library as ``2e / (1 + e)``, ``e = exp(-2|z|)`` (no cancellation for tiny keeps); 1 where
    the importance is 0 by the spec (fewer than two elements, a constant tensor)."""
    x = h.detach().to("cpu", torch.float64).reshape(-1)
    n = x.numel()
    if n < 2 or bool((x == x[0]).all()):
        return torch.ones(h.shape, dtype=torch.float64)
    mean = x.sum() / n
    std = (((x - mean) ** 2).sum() / (n - 1)).sqrt()
    e = torch.exp(-2 * ((x - mean) / std).abs())
    return (2 * e / (1 + e)).reshape(h.shape)


def code_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many representable steps apart two tensors of stored keep factors (values >= 0) are at
    most: the difference of their bit patterns as integers (ulps for float32 and bfloat16, codes
    for uint8); 0 for empty tensors."""
    assert a.dtype == b.dtype
    as_int = {
        torch.float64: torch.int64,
        torch.float32: torch.int32,
        torch.bfloat16: torch.int16,
        torch.uint8: torch.uint8,
    }[a.dtype]
    diff = (a.cpu().view(as_int).long() - b.cpu().view(as_int).long()).abs()
    return int(diff.max()) if diff.numel() else 0


def layout_cases(layouts: list[str] = LAYOUTS) -> list:
    """``(dtype, keep_dtype, layout)`` parameters: every gradient dtype with every keep format when
    contiguous; in the other layouts each dtype with one format by rotation, so that every format
    still meets every layout and every dtype (Triton's interpreter is slow)."""
    out = []
    for li, layout in enumerate(layouts):
        for di, dtype in enumerate(GRAD_DTYPES):
            keeps = KEEP_DTYPES if layout == "contiguous" else [KEEP_DTYPES[(di + li) % 3]]
            for keep in keeps:
                name = f"{layout}-{str(dtype)[6:]}-keep_{str(keep)[6:]}"
                out.append(pytest.param(dtype, keep, layout, id=name))
    return out
