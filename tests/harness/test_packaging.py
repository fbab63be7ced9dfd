"""A plain install (without the ``harness`` extra) gives a CLI whose --help works and whose runs say
in one line which extra to install, before reading data or creating the output folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HIDDEN = ("tqdm", "matplotlib", "sklearn")
# Makes the harness extra's packages unimportable in the process it starts in.
BLOCKER = "import sys\nfor name in {names!r}:\n    sys.modules[name] = None\n"
MESSAGE = (
    "spg-fast: error: the harness needs scikit-learn, matplotlib: pip install 'spg-fast[harness]' "
    "(from a clone: pip install '.[harness]')\n"
)


def _without_extras(
    tmp_path: Path, command: list[str], path: list[Path]
) -> subprocess.CompletedProcess:
    blocker = tmp_path / "blocker"
    blocker.mkdir(exist_ok=True)
    (blocker / "sitecustomize.py").write_text(BLOCKER.format(names=HIDDEN))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, [blocker, *path])),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    return subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )


def _check(tmp_path: Path, cli: list[str], path: list[Path]) -> None:
    helped = _without_extras(tmp_path, [*cli, "run", "--help"], path)
    assert helped.returncode == 0 and "--method" in helped.stdout, helped.stderr
    failed = _without_extras(tmp_path, [*cli, "run", "--out", "out"], path)
    assert (failed.returncode, failed.stderr) == (2, MESSAGE)
    assert not (tmp_path / "out").exists()


# Both commands in one process (one import of torch instead of two).
BOTH = """
import sys
from spg_fast import cli
try:
    cli.main(["run", "--help"])
except SystemExit as e:
    assert e.code == 0, e.code
sys.exit(cli.main(["run", "--out", "out"]))
"""


def test_the_cli_without_the_harness_extra(tmp_path):
    done = _without_extras(tmp_path, [sys.executable, "-c", BOTH], [ROOT])
    assert done.returncode == 2 and "--method" in done.stdout, done.stderr
    assert done.stderr == MESSAGE and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_plain_install_without_the_harness_extra(tmp_path):
    """``pip install .`` (dependencies as they are here, no extras) into its own folder, then its
    ``spg-fast`` script."""
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(site), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    _check(tmp_path, [sys.executable, str(site / "bin" / "spg-fast")], [site])
