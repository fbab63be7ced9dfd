"""The repository's top-level ``kernels/`` folder (installed as ``spg_fast.kernels``) must not
shadow PyPI's ``kernels`` package, which ``transformers`` 5 imports, when Python runs from the
repository root."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_kernels_folder_is_no_top_level_package():
    assert (ROOT / "kernels" / "triton").is_dir() and not (
        ROOT / "kernels" / "__init__.py"
    ).exists()
    probe = (
        "import importlib.util; spec = importlib.util.find_spec('kernels'); "
        "print(spec.origin if spec is not None and spec.origin else '')"
    )
    origin = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert not origin or not Path(origin).resolve().is_relative_to(ROOT / "kernels"), origin


def test_the_native_code_imports_as_spg_fast_kernels():
    import spg_fast.kernels.cpu
    import spg_fast.kernels.triton

    # From the repository's kernels/ in an editable install, from spg_fast/kernels/ in
    # site-packages otherwise.
    for module, name in ((spg_fast.kernels.triton, "triton"), (spg_fast.kernels.cpu, "cpu")):
        assert Path(module.__file__).resolve().parent.parts[-2:] == ("kernels", name)
    assert (Path(spg_fast.kernels.cpu.__file__).parent / "fused_steps.c").is_file()
