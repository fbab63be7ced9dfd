"""The stored keep factors (``spg_fast.storage``) in Triton: decode to float32 in registers, and
encode a float32 keep factor, bit-identical to the reference compiled and interpreted (integer
operations on the float32 bits, no rounding mode involved)."""

import triton
import triton.language as tl

from spg_fast.kernels.triton.rounding import round_to

# The uint8 code c stands for the float32 with bits (c + U8_OFFSET) << U8_SHIFT (see storage).
U8_SHIFT = tl.constexpr(20)
U8_OFFSET = tl.constexpr(761)
U8_HALF = tl.constexpr(1 << 19)  # half the step of the last kept bit: rounds to nearest


@triton.jit
def decode(x, SDT: tl.constexpr):
    """The float32 keep factor of stored values ``x`` of dtype ``SDT``."""
    if tl.uint8 == SDT:
        bits = (x.to(tl.uint32) + U8_OFFSET) << U8_SHIFT
        k = tl.where(x == 0, 0.0, bits.to(tl.float32, bitcast=True))
    elif tl.bfloat16 == SDT:
        # From the bits: Triton's interpreter converts bfloat16 subnormals to float32 wrongly.
        bits = x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
        k = bits.to(tl.float32, bitcast=True)
    else:
        k = x.to(tl.float32)
    return k


@triton.jit
def encode(k, SDT: tl.constexpr):
    """Float32 keep factors ``k`` (in [0, 1]) stored as ``SDT``: float32 as they are, bfloat16
    rounded to nearest even and never to 0 from above 0, uint8 as the nearest E5M3 code."""
    if tl.uint8 == SDT:
        bits = k.to(tl.uint32, bitcast=True)
        code = ((bits + U8_HALF) >> U8_SHIFT).to(tl.int32) - U8_OFFSET
        code = tl.minimum(tl.maximum(code, 1), 255)
        out = tl.where(k > 0.0, code, 0).to(tl.uint8)
    elif tl.bfloat16 == SDT:
        rounded = round_to(k, tl.bfloat16).to(tl.uint16, bitcast=True)
        lifted = tl.where((rounded == 0) & (k > 0.0), 1, rounded).to(tl.uint16)
        out = lifted.to(tl.bfloat16, bitcast=True)
    else:
        out = k
    return out
