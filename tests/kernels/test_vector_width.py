"""The compiled kernels move full tiles with 16-byte accesses (cross-compiled for sm_90; no
GPU needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_full_tiles_use_16_byte_accesses():
    # Compilation needs the real jit functions, which TRITON_INTERPRET=1 (set for this
    # suite) replaces.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "bench.ptx_widths"],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).parents[2],
        check=True,
    ).stdout
    rows = [
        line for line in out.splitlines() if line.startswith("| ") and "." in line.split("|")[1]
    ]
    assert len(rows) == 10, out
    for row in rows:
        assert "ld.global.v4.b32" in row, row
        if "_tile_stats" not in row:  # the statistics pass writes only per-tile scalars
            assert "st.global.v4.b32" in row, row
