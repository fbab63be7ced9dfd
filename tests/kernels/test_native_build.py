"""Building, caching and choosing the native CPU steps; what happens on a machine that cannot
build them."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from spg_fast import _backend as backend
from spg_fast.kernels.cpu import adam_step, build, sgd_step


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty cache and no library loaded yet in this process; the normal state is
    restored afterwards."""
    monkeypatch.setenv("SPG_FAST_CACHE_DIR", str(tmp_path))
    build.load.cache_clear()
    backend._native_build_problem.cache_clear()
    yield tmp_path
    build.load.cache_clear()
    backend._native_build_problem.cache_clear()


def _openmp_runtimes() -> set[str]:
    return {
        line.split()[-1]
        for line in Path("/proc/self/maps").read_text().splitlines()
        if "libgomp" in line or "libomp" in line
    }


def test_builds_once_into_the_cache_sharing_torchs_openmp_runtime(fresh, monkeypatch):
    """A build into a fresh cache (unoptimised: -O3 takes seconds, and what is tested is the build
    and the cache, not the code): loading it adds no OpenMP runtime of its own, its libgomp resolves
    to one already loaded (torch's; other packages, e.g. scikit-learn, may have loaded theirs
    before); a second load finds it in the cache."""
    monkeypatch.setattr(build, "FLAGS", tuple("-O0" if f == "-O3" else f for f in build.FLAGS))
    before = _openmp_runtimes()
    build.load()
    assert _openmp_runtimes() == before
    assert any("torch" in path for path in before), before
    (library,) = fresh.glob("fused_steps-*.so")
    stamp = library.stat().st_mtime_ns
    build.load.cache_clear()
    build.load()
    assert [*fresh.glob("fused_steps-*.so")] == [library] and library.stat().st_mtime_ns == stamp
    assert not [p for p in fresh.iterdir() if p != library], "no scratch files are left behind"


def test_a_failing_compiler_is_named(fresh, monkeypatch):
    monkeypatch.setenv("CC", "false")
    with pytest.raises(build.NativeBuildError, match=r"false failed to compile fused_steps\.c"):
        build.load()
    monkeypatch.setenv("CC", "no-such-compiler")
    with pytest.raises(build.NativeBuildError, match="CC='no-such-compiler' is not found"):
        build.load()


def _tensors(dtype=torch.float32):
    return [torch.zeros(3, dtype=dtype), torch.zeros(3, dtype=dtype)]


def _keeps(dtype=torch.uint8):
    return [torch.zeros(3, dtype=dtype)]


def _is_native(steps: backend.StepKernels | None) -> bool:
    return isinstance(steps, backend.StepKernels) and all(
        s.__module__ in (sgd_step.__name__, adam_step.__name__) for s in steps
    )


def test_choice_of_steps(monkeypatch):
    choose = backend.TORCH_OPS.step_kernels
    monkeypatch.setenv("SPG_FAST_NATIVE", "auto")
    for keep_dtype in (torch.float32, torch.float64, torch.bfloat16, torch.uint8):
        assert _is_native(choose(_tensors(), _keeps(keep_dtype)))
        assert _is_native(choose(_tensors(torch.float64), _keeps(keep_dtype)))
    assert _is_native(choose(_tensors(), []))
    assert choose(_tensors(), _keeps(torch.float16)) is None
    assert choose(_tensors(), [*_keeps(torch.uint8), *_keeps(torch.bfloat16)]) is None
    assert choose(_tensors(), [torch.zeros(3, 2, dtype=torch.uint8).t()]) is None
    assert choose(_tensors(torch.bfloat16), _keeps()) is None
    assert choose([torch.zeros(3, 2).t()], []) is None
    monkeypatch.setenv("SPG_FAST_NATIVE", "0")
    assert choose(_tensors(), _keeps()) is None
    monkeypatch.setenv("SPG_FAST_NATIVE", "yes")
    with pytest.raises(ValueError, match="SPG_FAST_NATIVE='yes' is not one of auto, 0, 1"):
        choose(_tensors(), _keeps())


def test_without_a_compiler_auto_warns_once_and_explicit_fails(fresh, monkeypatch):
    monkeypatch.setenv("CC", "false")
    monkeypatch.setenv("SPG_FAST_NATIVE", "1")
    with pytest.raises(build.NativeBuildError, match="failed to compile"):
        backend.TORCH_OPS.step_kernels(_tensors(), _keeps())
    backend._native_build_problem.cache_clear()
    monkeypatch.setenv("SPG_FAST_NATIVE", "auto")
    with pytest.warns(
        RuntimeWarning, match="native CPU optimizer steps are unavailable .*failed to compile"
    ):
        assert backend.TORCH_OPS.step_kernels(_tensors(), _keeps()) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backend.TORCH_OPS.step_kernels(_tensors(), _keeps()) is None
