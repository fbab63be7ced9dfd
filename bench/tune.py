"""Kernel-only timing of every Triton kernel across tile sizes and warp counts, against torch's own.

    python -m bench.tune [--sizes 1e8,1e9] [--blocks 1024,2048,4096,8192] [--warps 4,8]
                         [--keep float32|bfloat16|uint8]

The launch tables are built once, so only device time is measured (``triton.testing.do_bench``,
median); the numbers say which ``BLOCK`` / ``NUM_WARPS`` the launch plans should use, and how far
the kernels are from the measured copy bandwidth (the bytes model counts the stored keep factors at
their format's size). The masked steps run in update mode (gradient mode moves the same bytes).
GPU only.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton
import triton.language as tl

from bench import bytes_model
from bench.ops import synthetic_shapes
from bench.timing import stream_bandwidth
from spg_fast import storage
from spg_fast.kernels.triton import accumulate, adam_step, sgd_step, soft_mask
from spg_fast.kernels.triton.multi_tensor import TL_DTYPES, pointer_table, tile_table

KEEPS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "uint8": torch.uint8}


def _median_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def tune(
    numel: int,
    blocks: list[int],
    warps: list[int],
    bandwidth: float,
    keep: str = "float32",
    device: str = "cuda",
) -> list[dict]:
    dev = torch.device(device)
    shapes = synthetic_shapes(numel)
    mk = lambda: [torch.randn(s, device=dev) for s in shapes]  # noqa: E731
    p, g, m, v, before = mk(), mk(), mk(), mk(), mk()
    # stored keep factors (importance below 1e-3) in the format benchmarked
    a = [storage.encode(1 - torch.rand(s, device=dev) * 1e-3, KEEPS[keep]) for s in shapes]
    keep_bytes = bytes_model.KEEP_BYTES[keep]
    v = [x.abs() for x in v]
    step = [torch.full((), 3.0, device=dev) for _ in shapes]
    one = torch.ones(1, device=dev)
    tensors = dict(p=p, g=g, m=m, v=v, a=a, before=before, step=step)
    ptr = {k: pointer_table(x, dev) for k, x in tensors.items()}
    first = torch.zeros(len(shapes), dtype=torch.int8, device=dev)
    rows = []

    def record(op: str, impl: str, ms: float, factor_bytes: int = keep_bytes) -> None:
        nbytes = numel * bytes_model.bytes_per_element(op, 4, factor_bytes)
        rows.append(
            dict(
                op=op,
                impl=impl,
                keep=keep,
                params=numel,
                ms=ms,
                fraction=nbytes / (ms / 1e3) / bandwidth,
            )
        )
        print(
            f"{op:22} {numel:.0e} {keep:8} {impl:28} {ms:8.3f} ms "
            f"{rows[-1]['fraction']:6.1%} of copy",
            flush=True,
        )

    adt = TL_DTYPES[KEEPS[keep]]
    common = dict(
        ADT=adt,
        HAS_MASK=True,
        UPDATE=True,
        HAS_GRAD_SCALE=False,
        HAS_FOUND_INF=False,
        LR_TENSOR=False,
        ALIGNED=True,
    )

    def sweep(block: int, nw: int) -> None:
        tt, ts, n = tile_table(p, dev, block)
        grid = (tt.numel(),)
        tag = f"BLOCK={block} warps={nw}"
        for op, update in (("mask", False), ("update_mask", True)):
            record(
                op,
                tag,
                _median_ms(
                    lambda update=update: soft_mask._soft_mask[grid](
                        ptr["p" if update else "g"],
                        ptr["before"],
                        ptr["a"],
                        n,
                        tt,
                        ts,
                        one,
                        len(g),
                        XDT=tl.float32,
                        ADT=adt,
                        UPDATE=update,
                        BLOCK=block,
                        ALIGNED=True,
                        num_warps=nw,
                        enable_fp_fusion=False,
                    )
                ),
            )
        record(
            "sgd_momentum_masked",
            tag,
            _median_ms(
                lambda: sgd_step._sgd_step[grid](
                    ptr["p"],
                    ptr["g"],
                    ptr["a"],
                    ptr["m"],
                    first,
                    n,
                    tt,
                    ts,
                    one,
                    len(p),
                    one,
                    one,
                    one,
                    1e-6,
                    0.0,
                    0.9,
                    0.0,
                    PDT=tl.float32,
                    HAS_WD=False,
                    HAS_MOMENTUM=True,
                    NESTEROV=False,
                    MAXIMIZE=False,
                    BLOCK=block,
                    num_warps=nw,
                    **common,
                )
            ),
        )
        record(
            "adamw_masked",
            tag,
            _median_ms(
                lambda: adam_step._adam_step[grid](
                    ptr["p"],
                    ptr["g"],
                    ptr["a"],
                    ptr["m"],
                    ptr["v"],
                    ptr["v"],
                    ptr["step"],
                    n,
                    tt,
                    ts,
                    one,
                    len(p),
                    one,
                    one,
                    one,
                    1e-6,
                    0.0,
                    0.1,
                    0.999,
                    0.001,
                    -0.105,
                    0.0,
                    -0.001,
                    0.0,
                    1e-8,
                    1e-2,
                    1.0 - 1e-8,
                    1e-8,
                    PDT=tl.float32,
                    HAS_WD=True,
                    DECOUPLED=True,
                    AMSGRAD=False,
                    MAXIMIZE=False,
                    BLOCK=block,
                    num_warps=nw,
                    **common,
                )
            ),
        )
        partials = torch.empty(tt.numel(), 2, dtype=torch.float64, device=dev)
        stats = torch.zeros(len(p), 3, dtype=torch.float64, device=dev)
        stats[:, 1] = 1.0
        record(
            "importance_stats",
            tag,
            _median_ms(
                lambda: accumulate._tile_stats[grid](
                    ptr["g"],
                    n,
                    tt,
                    ts,
                    partials,
                    DT=tl.float32,
                    BLOCK=block,
                    ALIGNED=True,
                    num_warps=nw,
                )
            ),
        )
        record(
            "importance_update",
            tag,
            _median_ms(
                lambda: accumulate._update[grid](
                    ptr["g"],
                    ptr["a"],
                    n,
                    tt,
                    ts,
                    stats,
                    DT=tl.float32,
                    ADT=adt,
                    BLOCK=block,
                    ALIGNED=True,
                    num_warps=nw,
                )
            ),
        )

    for block, nw in itertools.product(blocks, warps):
        sweep(block, nw)

    keeps = [storage.decode(x) for x in a]
    # torch multiplies by the decoded float32 factors
    record("mask", "torch._foreach_mul_", _median_ms(lambda: torch._foreach_mul_(g, keeps)), 4)
    sgd = torch.optim.SGD(p, lr=1e-6, momentum=0.9, fused=True)
    adamw = torch.optim.AdamW(p, lr=1e-6, fused=True)
    for x, y in zip(p, g, strict=True):
        x.grad = y
    record("sgd_momentum", "torch fused (unmasked)", _median_ms(sgd.step))
    record("adamw", "torch fused (unmasked)", _median_ms(adamw.step))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e8,1e9")
    parser.add_argument("--blocks", default="1024,2048,4096,8192")
    parser.add_argument("--warps", default="4,8")
    parser.add_argument("--keep", default="float32", choices=list(KEEPS))
    args = parser.parse_args(argv)
    bandwidth, _ = stream_bandwidth(torch.device("cuda"), 1 << 30)
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)
    for size in args.sizes.split(","):
        tune(
            int(float(size)),
            [int(b) for b in args.blocks.split(",")],
            [int(w) for w in args.warps.split(",")],
            bandwidth,
            args.keep,
        )
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
