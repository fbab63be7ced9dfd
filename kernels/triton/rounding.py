"""Rounding of float32 results to a kernel's storage dtype, identical compiled and interpreted.

Triton's interpreter converts float32 to bfloat16 by truncation (and its "rtne" mode rounds ties
away), while compiled code and PyTorch round to nearest even. Rounding with integer operations gives
the same bits everywhere.
"""

import triton
import triton.language as tl


@triton.jit
def round_to(x, DT: tl.constexpr):
    """``x`` (float32) rounded to nearest even in ``DT`` (float32, bfloat16 or float16)."""
    if tl.bfloat16 == DT:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        # NaN is chosen in the integer domain: triton 3.6's interpreter cannot build a
        # bfloat16 constant.
        rounded = tl.where(x == x, rounded, 0x7FC0)
        out = rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = x.to(DT)
    return out
