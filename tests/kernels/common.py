"""Inputs for the kernel parity tests: the device the kernels run on, and random tensors in
awkward layouts."""

from __future__ import annotations

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GRAD_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LAYOUTS = ["contiguous", "transposed", "strided", "offset"]
# Sizes straddling the kernels' 1024-element tiles, one-element and zero-size tensors.
SHAPES = [(1,), (2,), (7, 3), (1023,), (1025,), (3, 700), (0,), (0, 5)]


def random_tensor(
    shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator, layout: str = "contiguous"
) -> torch.Tensor:
    """Random values with a random spread and offset on DEVICE, in ``layout``: contiguous;
    transposed (dense but permuted, like channels_last); strided (every other row of a larger
    tensor); offset (a view at a storage offset)."""
    scale = float(torch.rand((), generator=gen)) * 5 + 0.05
    offset = float(torch.randn((), generator=gen)) * 4

    def values(s: tuple[int, ...]) -> torch.Tensor:
        return (
            (torch.randn(s, generator=gen, dtype=torch.float64) * scale + offset)
            .to(dtype)
            .to(DEVICE)
        )

    if layout == "contiguous":
        return values(shape)
    if layout == "transposed":
        return values(shape[::-1]).permute(*reversed(range(len(shape))))
    if layout == "strided":
        return values((2 * shape[0], *shape[1:]))[::2]
    if layout == "offset":
        return values((shape[0] + 1, *shape[1:]))[1:]
    raise ValueError(layout)
