"""The frameworks are optional: importing spg-fast (integrations package included) imports neither
of them."""

from __future__ import annotations

import subprocess
import sys


def test_importing_spg_fast_imports_no_framework():
    code = (
        "import sys, spg_fast, spg_fast.integrations; "
        "print(sorted(m for m in ('lightning', 'pytorch_lightning', 'transformers', 'accelerate') "
        "if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
