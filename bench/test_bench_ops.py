"""Quick pytest-benchmark runs of every op and implementation at a small size: ``pytest bench -q``.

These time, they do not assert speed; ``python -m bench.run`` is the full suite with the
bytes model.
"""

from __future__ import annotations

import pytest
import torch

from bench.ops import IMPLEMENTATIONS, make_problem, synthetic_shapes

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = [
    (op, impl) for op, impls in IMPLEMENTATIONS.items() for impl in impls if "compile" not in impl
]


@pytest.mark.parametrize("keep", [None, torch.uint8], ids=["keep_f32", "keep_u8"])
@pytest.mark.parametrize("op, impl", CASES, ids=[f"{op}-{impl}" for op, impl in CASES])
def test_op(benchmark, op, impl, keep):
    torch.set_flush_denormal(True)
    shapes = synthetic_shapes(300_000, chunk=65_536)
    problem = make_problem(shapes, torch.float32, DEVICE, importance_dtype=keep)
    step = IMPLEMENTATIONS[op][impl](problem)

    def run() -> None:
        step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info["params"] = problem.numel
    benchmark.extra_info["keep"] = str(problem.keeps[0].dtype)
    benchmark(run)
