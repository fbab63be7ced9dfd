"""Cross-compile every kernel for a GPU target (no GPU needed: Triton ships ptxas) and report the
widths of its global loads and stores, to check that full tiles move each thread's elements in
whole vectors (16 bytes for 32-bit and 16-bit streams, 8 bytes for the uint8 keep factors).

    python -m bench.ptx_widths [--arch 90] [--keeps fp32,bf16,uint8] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import re
import warnings
from collections import Counter
from typing import NamedTuple

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from spg_fast.kernels.triton import accumulate, adam_step, sgd_step, soft_mask

_ACCESS = re.compile(r"\b((?:ld|st)\.global(?:\.[a-z0-9]+)*)")
# Runtime arguments by name: pointer tables and tile tables are int64, ``*_ptr`` device scalars
# float32, the rest float32 scalars.
_ARG_TYPES = {
    "first_flags": "*i8",
    "partials": "*fp64",
    "stats": "*fp64",
    "numels": "*i64",
    "tile_tensor": "*i64",
    "tile_start": "*i64",
    "n_shared": "i32",
}


class Row(NamedTuple):
    """One kernel compiled for parameters of ``dtype`` reading keep factors stored as ``keep``."""

    name: str
    kernel: object
    dtype: tl.dtype
    keep: tl.dtype
    update: bool


def rows(dtype: tl.dtype, keep: tl.dtype) -> list[Row]:
    """Every kernel for ``dtype`` tensors and ``keep`` storage, the mask kernel in both modes (the
    update mode reads the values before the step too); the statistics pass reads no keep factors,
    so it is listed with float32 storage only."""
    out = [
        Row("accumulate._update", accumulate._update, dtype, keep, False),
        Row("soft_mask._soft_mask", soft_mask._soft_mask, dtype, keep, False),
        Row("soft_mask._soft_mask (update)", soft_mask._soft_mask, dtype, keep, True),
        Row("sgd_step._sgd_step", sgd_step._sgd_step, dtype, keep, True),
        Row("adam_step._adam_step", adam_step._adam_step, dtype, keep, True),
    ]
    if keep == tl.float32:
        out.insert(0, Row("accumulate._tile_stats", accumulate._tile_stats, dtype, keep, False))
    return out


KEEPS = {"fp32": tl.float32, "bf16": tl.bfloat16, "uint8": tl.uint8}


def combinations(keeps: list[str]) -> list[tuple[tl.dtype, tl.dtype]]:
    """(parameter dtype, keep storage) pairs reported: float32 and bfloat16 parameters with float32
    keep factors, and float32 parameters with each narrow format of ``keeps``."""
    return [(tl.float32, tl.float32), (tl.bfloat16, tl.float32)] + [
        (tl.float32, KEEPS[k]) for k in keeps if k != "fp32"
    ]


def _jit(kernel: object) -> triton.JITFunction:
    """The compilable function, also when TRITON_INTERPRET=1 replaced it with the
    interpreter's wrapper."""
    return kernel if isinstance(kernel, triton.JITFunction) else triton.JITFunction(kernel.fn)


def _arg_type(name: str) -> str:
    if name in _ARG_TYPES:
        return _ARG_TYPES[name]
    if name.endswith("_ptrs"):
        return "*i64"
    return "*fp32" if name.endswith("_ptr") else "fp32"


def compile_args(row: Row) -> tuple[dict[str, str], dict[str, object]]:
    """The runtime signature and compile-time values of ``row``'s kernel: every option on that
    costs memory traffic (mask, weight decay, momentum), none that adds a stream (GradScaler)."""
    flags = dict(
        PDT=row.dtype,
        DT=row.dtype,
        XDT=row.dtype,
        ADT=row.keep,
        UPDATE=row.update,
        HAS_MASK=True,
        HAS_GRAD_SCALE=False,
        HAS_FOUND_INF=False,
        LR_TENSOR=False,
        MAXIMIZE=False,
        HAS_WD=True,
        HAS_MOMENTUM=True,
        NESTEROV=False,
        DECOUPLED=True,
        AMSGRAD=False,
        BLOCK=1024,
        ALIGNED=True,
    )
    fn = _jit(row.kernel)
    signature = {p.name: _arg_type(p.name) for p in fn.params if not p.is_constexpr}
    constexprs = {p.name: flags[p.name] for p in fn.params if p.is_constexpr}
    return signature, constexprs


def access_widths(row: Row, arch: int = 90) -> Counter[str]:
    """How many of each global load/store instruction the compiled PTX of ``row`` holds."""
    signature, constexprs = compile_args(row)
    sig = {**signature, **{name: "constexpr" for name in constexprs}}
    src = ASTSource(fn=_jit(row.kernel), signature=sig, constexprs=constexprs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})
    return Counter(_ACCESS.findall(compiled.asm["ptx"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--arch", type=int, default=90, help="compute capability, e.g. 90 for H100/H200"
    )
    parser.add_argument(
        "--keeps", default="fp32,bf16,uint8", help="keep storage formats: fp32, bf16, uint8"
    )
    parser.add_argument("--out", help="also write the table to this markdown file")
    args = parser.parse_args()
    lines = [
        f"Global memory accesses in the PTX for sm_{args.arch} (triton {triton.__version__}), full "
        "and tail tiles together; v4.b32 = 16 bytes, v2.b32 = 8 bytes.",
        "",
        "| kernel | dtype | keep | accesses (count) |",
        "|---|---|---|---|",
    ]
    for dtype, keep in combinations(args.keeps.split(",")):
        for row in rows(dtype, keep):
            found = access_widths(row, args.arch)
            lines.append(
                f"| {row.name} | {dtype} | {keep} "
                f"| {', '.join(f'{k} ({v})' for k, v in sorted(found.items()))} |"
            )
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
