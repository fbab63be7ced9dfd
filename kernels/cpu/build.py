"""Compile ``fused_steps.c`` with the system C compiler on first use and load it, cached
per machine.

The library is built for the CPU it runs on (``-march=native``) and with OpenMP; it links
``libgomp.so.1``, which resolves to the copy PyTorch has already loaded, so the steps share torch's
thread pool and thread count instead of competing with it. The cache key covers the source, the
compiler, the flags and the CPU's instruction set, so a home directory shared by different machines
never loads a library built for another CPU. Like Triton's and Inductor's caches it lives under
``~/.cache`` (``$SPG_FAST_CACHE_DIR`` or ``$XDG_CACHE_HOME`` move it).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("fused_steps.c")
# -ffp-contract=off: no fused multiply-adds, so the vectorised body and the scalar remainder of a
# loop round alike and the result does not depend on where the thread slices cut a tensor (with
# contraction, 1 and 3 threads gave different bits on the 16-core host of the GPU machine).
FLAGS = (
    "-O3",
    "-march=native",
    "-ffp-contract=off",
    "-fno-math-errno",
    "-fopenmp",
    "-fPIC",
    "-shared",
)


class NativeBuildError(RuntimeError):
    """The native CPU kernels cannot be built or loaded here; the message says why."""


def cache_dir() -> Path:
    if "SPG_FAST_CACHE_DIR" in os.environ:
        return Path(os.environ["SPG_FAST_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "spg_fast"


def _compiler() -> str:
    if "CC" in os.environ:
        if not shutil.which(os.environ["CC"]):
            raise NativeBuildError(f"the C compiler CC={os.environ['CC']!r} is not found")
        return os.environ["CC"]
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return name
    raise NativeBuildError("no C compiler found (set CC, or install gcc or clang)")


def _cpu_signature() -> str:
    """What the compiled code depends on about this CPU: its instruction-set flags where Linux
    lists them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        partial = Path(scratch) / target.name
        result = subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", str(partial)], capture_output=True, text=True
        )
        if result.returncode != 0:
            raise NativeBuildError(
                f"{compiler} failed to compile {SOURCE.name}:\n{result.stderr.strip()}"
            )
        os.replace(
            partial, target
        )  # atomic: a concurrent process loads either no file or a whole one


@functools.cache
def load() -> ctypes.CDLL:
    """The compiled library, built now if this machine has none cached. Raises NativeBuildError
    saying why not."""
    if platform.system() != "Linux":
        raise NativeBuildError(
            f"the native CPU kernels are built on Linux only, not on {platform.system()}"
        )
    if not torch.backends.openmp.is_available():
        raise NativeBuildError(
            "this PyTorch build has no OpenMP, whose thread pool the native kernels share"
        )
    compiler = _compiler()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        "\n".join([SOURCE.read_text(), version, " ".join(FLAGS), _cpu_signature()]).encode()
    )
    target = cache_dir() / f"fused_steps-{key.hexdigest()[:16]}.so"
    if not target.exists():
        _build(compiler, target)
    try:
        return ctypes.CDLL(str(target))
    except OSError as error:
        raise NativeBuildError(f"cannot load {target}: {error}") from error
