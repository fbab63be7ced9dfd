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


def test_builds_once_into_the_cache(fresh):
    build.load()
    (library,) = fresh.glob("fused_steps-*.so")
    stamp = library.stat().st_mtime_ns
    build.load.cache_clear()
    build.load()
    assert [*fresh.glob("fused_steps-*.so")] == [library] and library.stat().st_mtime_ns == stamp
    assert not [p for p in fresh.iterdir() if p != library], "no scratch files are left behind"


def _openmp_runtimes() -> set[str]:
    return {
        line.split()[-1]
        for line in Path("/proc/self/maps").read_text().splitlines()
        if "libgomp" in line or "libomp" in line
    }


def test_shares_torchs_openmp_runtime(fresh):
    """Loading the library adds no OpenMP runtime of its own: its libgomp resolves to one already
    loaded (torch's; other packages, e.g. scikit-learn, may have loaded theirs before)."""
    before = _openmp_runtimes()
    build.load()
    assert _openmp_runtimes() == before
    assert any("torch" in path for path in before), before


def test_a_failing_compiler_is_named(fresh, monkeypatch):
    monkeypatch.setenv("CC", "false")
    with pytest.raises(build.NativeBuildError, match=r"false failed to compile fused_steps\.c"):
        build.load()
    monkeypatch.setenv("CC", "no-such-compiler")
    with pytest.raises(build.NativeBuildError, match="CC='no-such-compiler' is not found"):
        build.load()


def _tensors(dtype=torch.float32):
    return [torch.zeros(3, dtype=dtype), torch.zeros(3, dtype=dtype)]


def test_choice_of_steps(monkeypatch):
    native = backend.StepKernels(sgd_step.sgd_step_, adam_step.adam_step_)
    choose = backend.TORCH_OPS.step_kernels
    monkeypatch.setenv("SPG_FAST_NATIVE", "auto")
    assert choose(_tensors()) == native
    assert choose(_tensors(torch.float64)) == native
    assert choose(_tensors(torch.bfloat16)) is None
    assert choose([torch.zeros(3, 2).t()]) is None
    monkeypatch.setenv("SPG_FAST_NATIVE", "0")
    assert choose(_tensors()) is None
    monkeypatch.setenv("SPG_FAST_NATIVE", "yes")
    with pytest.raises(ValueError, match="SPG_FAST_NATIVE='yes' is not one of auto, 0, 1"):
        choose(_tensors())


def test_without_a_compiler_auto_warns_once_and_explicit_fails(fresh, monkeypatch):
    monkeypatch.setenv("CC", "false")
    monkeypatch.setenv("SPG_FAST_NATIVE", "1")
    with pytest.raises(build.NativeBuildError, match="failed to compile"):
        backend.TORCH_OPS.step_kernels(_tensors())
    backend._native_build_problem.cache_clear()
    monkeypatch.setenv("SPG_FAST_NATIVE", "auto")
    with pytest.warns(
        RuntimeWarning, match="native CPU optimizer steps are unavailable .*failed to compile"
    ):
        assert backend.TORCH_OPS.step_kernels(_tensors()) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backend.TORCH_OPS.step_kernels(_tensors()) is None
