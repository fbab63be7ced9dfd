"""The compiled kernels move full tiles with vector accesses, for every stored keep format
(cross-compiled for sm_90; no GPU needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


# About 5 s of compilation for sm_90.
@pytest.mark.slow
def test_full_tiles_use_vector_accesses():
    """Every 32- and 16-bit stream moves a thread's elements in 16-byte accesses, the uint8 keep
    factors in 8-byte ones (eight per thread)."""
    # Compilation needs the real jit functions, which TRITON_INTERPRET=1 (set for this
    # suite) replaces.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "bench.ptx_widths", "--keeps", "fp32,uint8"],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).parents[2],
        check=True,
    ).stdout
    rows = [
        line.split("|")[1:-1]
        for line in out.splitlines()
        if line.startswith("| ") and "." in line.split("|")[1]
    ]
    assert len(rows) == 17, out
    for kernel, _dtype, keep, accesses in rows:
        assert "ld.global.v4.b32" in accesses, (kernel, keep)
        if "uint8" in keep:
            assert "ld.global.v2.b32" in accesses, (kernel, keep)
        if "_tile_stats" in kernel:  # the statistics pass writes only per-tile scalars
            continue
        if "accumulate._update" in kernel and "uint8" in keep:  # writes only the uint8 codes
            assert "st.global.v2.b32" in accesses, (kernel, keep)
        else:
            assert "st.global.v4.b32" in accesses, (kernel, keep)
