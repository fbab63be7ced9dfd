"""Cross-compile every kernel for a GPU target (no GPU needed: Triton ships ptxas) and report the widths of its
global loads and stores, to check that full tiles move 16 bytes per access.

    python -m bench.ptx_widths [--arch 90] [--out bench/results/ptx-widths.md]
"""  # noqa: E501

from __future__ import annotations

import argparse
import re
import warnings
from collections import Counter

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from spg_fast.kernels.triton import adam_step, importance_max, sgd_step, soft_mask

_ACCESS = re.compile(r"\b((?:ld|st)\.global(?:\.[a-z0-9]+)*)")
_COMMON = {"numels": "*i64", "tile_tensor": "*i64", "tile_start": "*i64"}
_OPT = {
    "scale_ptr": "*fp32",
    "n_shared": "i32",
    "grad_scale_ptr": "*fp32",
    "found_inf_ptr": "*fp32",
    "lr_ptr": "*fp32",
}


def kernels(dtype: tl.dtype) -> dict[str, tuple[object, dict[str, str], dict[str, object]]]:
    """name -> (kernel, runtime signature, constexprs) for parameters of ``dtype`` and
    float32 importance."""
    flags = dict(
        PDT=dtype,
        ADT=tl.float32,
        HAS_MASK=True,
        HAS_GRAD_SCALE=False,
        HAS_FOUND_INF=False,
        LR_TENSOR=False,
        MAXIMIZE=False,
        HAS_WD=True,
        BLOCK=1024,
        ALIGNED=True,
    )
    ptrs = lambda *names: {n: "*i64" for n in names}  # noqa: E731
    return {
        "importance_max._tile_stats": (
            importance_max._tile_stats,
            {**ptrs("h_ptrs"), **_COMMON, "partials": "*fp64"},
            dict(DT=dtype, BLOCK=1024, ALIGNED=True),
        ),
        "importance_max._update": (
            importance_max._update,
            {**ptrs("h_ptrs", "a_ptrs"), **_COMMON, "stats": "*fp64"},
            dict(DT=dtype, ADT=tl.float32, BLOCK=1024, ALIGNED=True),
        ),
        "soft_mask._soft_mask": (
            soft_mask._soft_mask,
            {**ptrs("g_ptrs", "a_ptrs"), **_COMMON, "scale_ptr": "*fp32", "n_shared": "i32"},
            dict(GDT=dtype, ADT=tl.float32, BLOCK=1024, ALIGNED=True),
        ),
        "sgd_step._sgd_step": (
            sgd_step._sgd_step,
            {
                **ptrs("p_ptrs", "g_ptrs", "a_ptrs", "buf_ptrs"),
                "first_flags": "*i8",
                **_COMMON,
                **_OPT,
                "lr": "fp32",
                "weight_decay": "fp32",
                "momentum": "fp32",
                "undamped": "fp32",
            },
            dict(flags, HAS_MOMENTUM=True, NESTEROV=False),
        ),
        "adam_step._adam_step": (
            adam_step._adam_step,
            {
                **ptrs("p_ptrs", "g_ptrs", "a_ptrs", "m_ptrs", "v_ptrs", "vmax_ptrs", "step_ptrs"),
                **_COMMON,
                **_OPT,
                **{
                    k: "fp32"
                    for k in (
                        "lr_hi",
                        "lr_lo",
                        "one_minus_beta1",
                        "beta2",
                        "one_minus_beta2",
                        "log_beta1_hi",
                        "log_beta1_lo",
                        "log_beta2_hi",
                        "log_beta2_lo",
                        "eps",
                        "weight_decay",
                        "decay",
                    )
                },
            },
            dict(flags, DECOUPLED=True, AMSGRAD=False),
        ),
    }


def _jit(kernel: object) -> triton.JITFunction:
    """The compilable function, also when TRITON_INTERPRET=1 replaced it with the
    interpreter's wrapper."""
    return kernel if isinstance(kernel, triton.JITFunction) else triton.JITFunction(kernel.fn)


def access_widths(
    kernel: object, signature: dict[str, str], constexprs: dict[str, object], arch: int = 90
) -> Counter[str]:
    """How many of each global load/store instruction the compiled PTX holds."""
    sig = {**signature, **{name: "constexpr" for name in constexprs}}
    src = ASTSource(fn=_jit(kernel), signature=sig, constexprs=constexprs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ptx = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4}).asm[
            "ptx"
        ]
    return Counter(_ACCESS.findall(ptx))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--arch", type=int, default=90, help="compute capability, e.g. 90 for H100/H200"
    )
    parser.add_argument("--out", help="also write the table to this markdown file")
    args = parser.parse_args()
    lines = [
        f"Global memory accesses in the PTX for sm_{args.arch} (triton {triton.__version__}), full "
        "and tail tiles together; v4.b32 = 16 bytes.",
        "",
        "| kernel | dtype | accesses (count) |",
        "|---|---|---|",
    ]
    for dtype in (tl.float32, tl.bfloat16):
        for name, (kernel, sig, consts) in kernels(dtype).items():
            found = access_widths(kernel, sig, consts, args.arch)
            lines.append(
                f"| {name} | {dtype} "
                f"| {', '.join(f'{k} ({v})' for k, v in sorted(found.items()))} |"
            )
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
