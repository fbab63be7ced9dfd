"""The stored keep formats (``spg_fast.storage``) and their three codecs: the reference's, the
Triton kernels' (``keep_codec``) and the native CPU steps'. Every code decodes alike everywhere and
encodes back to itself; no keep factor above 0 is stored as 0; the relative error stays within the
documented bound, also at rounding ties; accumulation over tasks is exact in every format."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from spg_fast import reference, storage
from spg_fast.kernels.cpu.sgd_step import sgd_step_ as native_sgd_step_
from spg_fast.kernels.triton import keep_codec
from spg_fast.kernels.triton.accumulate import accumulate_ as triton_accumulate_
from spg_fast.kernels.triton.soft_mask import soft_mask_ as triton_soft_mask_
from tests.kernels.common import DEVICE, code_distance, keep64

NARROW = [torch.bfloat16, torch.uint8]
FORMATS = [torch.float32, *NARROW]
ALL_CODES = torch.arange(256, dtype=torch.int32).to(torch.uint8)
# Every bfloat16 keep factor: the bit patterns from 0 up to 1.0 (0x3F80), subnormals included.
ALL_BF16 = torch.arange(0x3F81, dtype=torch.int16).view(torch.bfloat16)
FORMAT_CODES = {torch.uint8: ALL_CODES, torch.bfloat16: ALL_BF16}
# uint8: the relative error bound holds down to 2**-31 (the smallest code is 1.25 * 2**-32).
U8_BOUND_FROM = 2.0**-31


def _f32(bits: torch.Tensor) -> torch.Tensor:
    return bits.to(torch.int32).view(torch.float32)


def _bits(k: torch.Tensor) -> torch.Tensor:
    return k.view(torch.int32).long()


def _positive_float32_sweep() -> torch.Tensor:
    """Float32 keep factors in (0, 1]: every binade from the smallest subnormal up (several
    mantissas each, the binade's ends included), and every subnormal of one and two bits."""
    exponents = torch.arange(-149, 1, dtype=torch.float64)
    mantissas = torch.tensor([1.0, 1.0625, 1.1875, 1.25, 1.5, 1.75, 1.96875, 2 - 2.0**-23])
    k = (torch.exp2(exponents)[:, None] * mantissas[None, :]).reshape(-1).float()
    subnormals = _f32(torch.cat([1 << torch.arange(23), 3 << torch.arange(22)]))
    k = torch.cat([k, subnormals, torch.tensor([1.0])])
    return k[(k > 0) & (k <= 1)].unique()


def _ties(fmt: torch.dtype) -> torch.Tensor:
    """Float32 values at the rounding ties of ``fmt`` between adjacent stored values above 0 (the
    tie below the smallest is the no-hard-freeze rule's), and their float32 neighbours on either
    side."""
    if fmt == torch.bfloat16:
        upper = ALL_BF16[2:].view(torch.int16).to(torch.int32) << 16
        ties = upper - (1 << 15)  # half a bfloat16 step below each
    else:
        upper = (ALL_CODES[2:].to(torch.int32) + 761) << 20
        ties = upper - (1 << 19)
    ties = _f32(ties)
    below = torch.nextafter(ties, torch.tensor(0.0))
    above = torch.nextafter(ties, torch.tensor(1.0))
    return torch.cat([below, ties, above])


def _random_keeps(n: int, seed: int) -> torch.Tensor:
    """Float32 keep factors log-uniform from 1e-38 to 1 and uniform on (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    log_uniform = torch.exp2(-126 * torch.rand(n, generator=g, dtype=torch.float64))
    return torch.cat([log_uniform, torch.rand(n, generator=g, dtype=torch.float64)]).float()


@triton.jit
def _codec(src, dst, n, SDT: tl.constexpr, ENCODE: tl.constexpr, BLOCK: tl.constexpr):  # noqa: N803
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    x = tl.load(src + offs, mask=inside)
    if ENCODE:
        tl.store(dst + offs, keep_codec.encode(x, SDT), mask=inside)
    else:
        tl.store(dst + offs, keep_codec.decode(x, SDT), mask=inside)


_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.uint8: tl.uint8}


def _triton_codec(x: torch.Tensor, fmt: torch.dtype, encode: bool) -> torch.Tensor:
    """``keep_codec.encode`` (float32 -> ``fmt``) or ``decode`` (``fmt`` -> float32) in a kernel."""
    src = x.contiguous().to(DEVICE)
    dst = torch.empty(src.shape, dtype=fmt if encode else torch.float32, device=DEVICE)
    if src.numel():
        grid = (triton.cdiv(src.numel(), 1024),)
        _codec[grid](src, dst, src.numel(), SDT=_TL[fmt], ENCODE=encode, BLOCK=1024)
    return dst.cpu()


def _native_decode(stored: torch.Tensor, param_dtype: torch.dtype) -> torch.Tensor:
    """The keep factors the native C step reads from ``stored``: SGD with lr 1 on a gradient of 1
    from a parameter of 0 leaves ``-keep``."""
    params = [torch.zeros(stored.shape, dtype=param_dtype)]
    native_sgd_step_(
        params,
        [torch.ones_like(params[0])],
        [stored],
        [],
        [False],
        torch.ones(()),
        False,
        None,
        None,
        lr=1.0,
        weight_decay=0.0,
        momentum=0.0,
        dampening=0.0,
        nesterov=False,
        maximize=False,
    )
    return -params[0]


@pytest.mark.parametrize("fmt", NARROW, ids=["bf16", "u8"])
def test_every_code_decodes_alike_everywhere(fmt):
    """Reference, Triton (a kernel calling ``keep_codec.decode``, and ``soft_mask_`` on gradients of
    1) and the native C step (float32 and float64 parameters) all read each stored value as the
    format defines it (``keep64``)."""
    codes = FORMAT_CODES[fmt]
    want = keep64(codes)
    assert want.min() == 0 and want.max() == 1 and bool((want[1:] > want[:-1]).all())
    assert torch.equal(storage.decode(codes).double(), want)
    assert torch.equal(reference.keep_factors([codes])[0].double(), want)
    assert torch.equal(_triton_codec(codes, fmt, encode=False).double(), want)
    grads = [torch.ones(codes.shape, device=DEVICE)]
    triton_soft_mask_(grads, [codes.to(DEVICE)], [], torch.ones((), device=DEVICE))
    assert torch.equal(grads[0].cpu().double(), want)
    for param_dtype in (torch.float32, torch.float64):
        assert torch.equal(_native_decode(codes, param_dtype).double(), want)


@pytest.mark.parametrize("fmt", NARROW, ids=["bf16", "u8"])
def test_every_code_encodes_back_to_itself(fmt):
    codes = FORMAT_CODES[fmt]
    decoded = storage.decode(codes)
    assert torch.equal(storage.encode(decoded, fmt), codes)
    assert torch.equal(_triton_codec(decoded, fmt, encode=True), codes)


@pytest.mark.parametrize("fmt", FORMATS, ids=["f32", "bf16", "u8"])
def test_no_keep_above_zero_is_stored_as_zero(fmt):
    """The no-hard-freeze rule: every float32 keep factor above 0 (subnormals included) decodes
    above 0 in every format, by the reference and by the Triton encoder alike; 0 stays 0."""
    k = torch.cat([_positive_float32_sweep(), _random_keeps(1000, seed=1)])
    stored = storage.encode(k, fmt)
    assert torch.equal(_triton_codec(k, fmt, encode=True), stored)
    assert bool((storage.decode(stored) > 0).all())
    assert float(storage.decode(storage.encode(torch.zeros(3), fmt)).abs().max()) == 0.0
    assert torch.equal(storage.decode(storage.fresh((4,), fmt, torch.device("cpu"))), torch.ones(4))


@pytest.mark.parametrize("fmt", NARROW, ids=["bf16", "u8"])
def test_relative_error_stays_within_the_documented_bound(fmt):
    """Random keep factors and the rounding ties (with their float32 neighbours): the relative error
    of ``decode(encode(k))`` stays within ``storage.RELATIVE_ERROR`` (bfloat16: every normal k;
    uint8: every k from 2**-31), rounding goes to the nearest stored value (ties: bfloat16 to even,
    uint8 away from zero), and the bound is nearly attained."""
    k = torch.cat([_random_keeps(20000, seed=2), _ties(fmt), _positive_float32_sweep()])
    stored = storage.encode(k, fmt)
    assert torch.equal(_triton_codec(k, fmt, encode=True), stored)
    got, k64 = keep64(stored), k.double()
    error = (got - k64).abs() / k64
    covered = k64 >= (2.0**-126 if fmt == torch.bfloat16 else U8_BOUND_FROM)
    worst = float(error[covered].max())
    bound = storage.RELATIVE_ERROR[fmt]
    assert bound / 2 < worst <= bound, worst
    # Nearest: no stored value lies closer to k than the chosen one.
    codes = FORMAT_CODES[fmt]
    values = keep64(codes)
    index = torch.searchsorted(values, k64)
    lower = values[(index - 1).clamp(min=0)]
    upper = values[index.clamp(max=values.numel() - 1)]
    nearest = torch.minimum((k64 - lower).abs(), (upper - k64).abs())
    inside = covered & (k64 <= 1)
    assert bool(((got - k64).abs()[inside] <= nearest[inside]).all())
    ties = _ties(fmt)[len(_ties(fmt)) // 3 : 2 * len(_ties(fmt)) // 3]
    tied = storage.encode(ties, fmt)
    if fmt == torch.uint8:  # away from zero: up to the larger code
        assert bool((keep64(tied) > ties.double()).all())
    else:  # to even: the stored bit pattern ends in 0
        assert bool((tied.view(torch.int16) % 2 == 0).all())


def test_uint8_floor_and_bfloat16_subnormals():
    """Below the documented ranges the formats still never give 0: uint8 keeps from 2**-149 to
    2**-32 all store code 1 (1.25 * 2**-32); bfloat16 subnormals below its smallest (2**-133) are
    lifted to it, above it rounded to nearest."""
    tiny = torch.tensor([2.0**-149, 1e-40, 2.0**-126, 2.0**-33, 2.0**-32])
    assert storage.encode(tiny, torch.uint8).tolist() == [1] * 5
    assert float(keep64(torch.tensor([1], dtype=torch.uint8))) == 1.25 * 2.0**-32
    smallest = 2.0**-133
    lifted = storage.encode(torch.tensor([2.0**-149, 2.0**-140, smallest * 0.49]), torch.bfloat16)
    assert lifted.double().tolist() == [smallest] * 3
    assert float(storage.encode(torch.tensor([smallest * 2.6]), torch.bfloat16)) == 3 * smallest


def _tasks(n_tasks: int, n: int, seed: int) -> list[torch.Tensor]:
    """Per task one gradient sum, heavy-tailed (Student-t, 2 degrees of freedom)."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(n, generator=g) / torch.randn(n, 2, generator=g).square().mean(1).sqrt()
        for _ in range(n_tasks)
    ]


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_accumulation_over_tasks_is_exact_in_every_format(impl):
    """Accumulating tasks one by one in a format equals encoding the minimum over tasks of the
    float32 keep factor: no drift from repeated rounding (every stored value encodes to itself and
    each encoding is monotone)."""
    accumulate = reference.accumulate_ if impl == "reference" else triton_accumulate_
    device = torch.device("cpu") if impl == "reference" else DEVICE
    tasks = [h.to(device) for h in _tasks(4, 1500, seed=3)]
    stored = [storage.fresh((1500,), fmt, device) for fmt in FORMATS]
    running = torch.ones(1500, dtype=torch.float64)
    for h in tasks:
        assert not bool(accumulate(stored, [h] * len(FORMATS)).any())
        running = torch.minimum(running, reference.keep(h.cpu()).double())
        for fmt, s in zip(FORMATS, stored, strict=True):
            assert torch.equal(s.cpu(), storage.encode(running.float(), fmt)), (impl, fmt)
    assert code_distance(stored[0], running.float()) == 0


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_heavy_tailed_outliers_keep_a_soft_mask(impl):
    """Gradient sums with a heavy tail and planted outliers at |z| from 3.5 to 9: the float32 keep
    factor stays above 0 there (down to ~3e-8), the narrow formats never store 0 where it is above
    0, and the keep factor the mask applies (``soft_mask_`` on gradients of 1) is within each
    format's bound of the float32 one."""
    accumulate = reference.accumulate_ if impl == "reference" else triton_accumulate_
    mask = reference.soft_mask_ if impl == "reference" else triton_soft_mask_
    device = torch.device("cpu") if impl == "reference" else DEVICE
    (h,) = _tasks(1, 4000, seed=4)
    h = (h - h.mean()) / h.std()
    z = torch.tensor([3.5, -4.0, 5.0, -6.0, 7.0, -8.0, 9.0])
    spots = torch.arange(len(z)) * 500 + 7
    # planted values that standardise to z once they are part of the statistics
    for _ in range(20):
        h[spots] = z * h.std() + h.mean()
    standardised = (h.double() - h.double().mean()) / h.double().std()
    assert torch.allclose(standardised[spots], z.double(), rtol=1e-3)
    h = h.to(device)
    stored = [storage.fresh(h.shape, fmt, device) for fmt in FORMATS]
    accumulate(stored, [h] * len(FORMATS))
    k32 = stored[0].cpu().double()
    assert bool((k32 > 0).all()) and float(k32[spots].min()) < 1e-7
    for fmt, s in zip(FORMATS[1:], stored[1:], strict=True):
        applied = [torch.ones(h.shape, device=device)]
        mask(applied, [s], [], torch.ones((), device=device))
        applied64 = applied[0].cpu().double()
        assert bool((applied64 > 0).all()), fmt
        error = (applied64 - k32).abs() / k32
        # the documented range: the heavy tail reaches beyond |z| = 11 too, where uint8 stores its
        # smallest code (still above 0)
        covered = k32 >= (2.0**-126 if fmt == torch.bfloat16 else U8_BOUND_FROM)
        assert bool(covered[spots].all())
        assert float(error[covered].max()) <= storage.RELATIVE_ERROR[fmt], fmt


def test_format_helpers():
    cpu = torch.device("cpu")
    assert storage.stored_dtype(torch.float32, None) == torch.float32
    assert storage.stored_dtype(torch.float64, None) == torch.float64
    assert storage.stored_dtype(torch.float64, torch.uint8) == torch.uint8
    assert storage.keep_dtype(torch.float64) == torch.float64
    assert all(storage.keep_dtype(d) == torch.float32 for d in FORMATS)
    assert storage.fresh((2, 3), torch.uint8, cpu).tolist() == [[255] * 3] * 2
    assert storage.fresh((2,), torch.bfloat16, cpu).dtype == torch.bfloat16
    k = torch.rand(5)
    assert storage.decode(k) is k and storage.decode(k.double()).dtype == torch.float64
    assert torch.equal(storage.encode(k.double(), torch.float64), k.double())
    for dtype in storage.IMPORTANCE_DTYPES:
        storage.check_importance_dtype(dtype)
    with pytest.raises(ValueError, match=r"importance_dtype must be None, torch\.float32"):
        storage.check_importance_dtype(torch.float16)
    with pytest.raises(ValueError, match=r"no importance storage in torch\.float16"):
        storage.encode(k, torch.float16)
    with pytest.raises(ValueError, match=r"no importance storage in torch\.int8"):
        storage.decode(k.to(torch.int8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_an_outlier_far_beyond_float32s_range_is_never_frozen(dtype):
    """|z| near 100 (exp(-2|z|) ~ 1e-87, below float32's smallest value): the importance is still
    below 1, so the stored keep factor is the format's smallest positive one, in the reference and
    the Triton kernel alike."""
    h = torch.zeros(10001)
    h[:5000] = 1.0
    h[0] = 1e4  # |z| about 100
    ours = [storage.fresh(h.shape, dtype, h.device)]
    kernel = [storage.fresh(h.shape, dtype, h.device)]
    reference.accumulate_(ours, [h])
    triton_accumulate_(kernel, [h])
    assert torch.equal(ours[0], kernel[0])
    smallest = storage.decode(ours[0])[0]
    assert 0 < float(smallest) <= 2.0**-31
