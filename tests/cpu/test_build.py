"""Building, caching and choosing the native CPU steps; what happens on a machine that cannot build them."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from spg_fast import backend
from spg_fast.cpu import build, steps


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty cache and no library loaded yet in this process; the normal state is restored afterwards."""
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


def test_shares_torchs_openmp_runtime(fresh):
    build.load()
    runtimes = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
                if "libgomp" in line or "libomp" in line}
    assert len(runtimes) == 1, runtimes


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
    monkeypatch.setenv("SPG_FAST_NATIVE", "auto")
    assert backend.fused_steps("torch", _tensors()) is steps
    assert backend.fused_steps("torch", _tensors(torch.float64)) is steps
    assert backend.fused_steps("torch", _tensors(torch.bfloat16)) is None
    assert backend.fused_steps("torch", [torch.zeros(3, 2).t()]) is None
    from spg_fast.kernels import optimizer_steps

    assert backend.fused_steps("triton", _tensors()) is optimizer_steps
    monkeypatch.setenv("SPG_FAST_NATIVE", "0")
    assert backend.fused_steps("torch", _tensors()) is None
    monkeypatch.setenv("SPG_FAST_NATIVE", "yes")
    with pytest.raises(ValueError, match="SPG_FAST_NATIVE='yes' is not one of auto, 0, 1"):
        backend.fused_steps("torch", _tensors())


def test_without_a_compiler_auto_warns_once_and_explicit_fails(fresh, monkeypatch):
    monkeypatch.setenv("CC", "false")
    monkeypatch.setenv("SPG_FAST_NATIVE", "1")
    with pytest.raises(build.NativeBuildError, match="failed to compile"):
        backend.fused_steps("torch", _tensors())
    backend._native_build_problem.cache_clear()
    monkeypatch.setenv("SPG_FAST_NATIVE", "auto")
    with pytest.warns(RuntimeWarning, match="native CPU optimizer steps are unavailable .*failed to compile"):
        assert backend.fused_steps("torch", _tensors()) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backend.fused_steps("torch", _tensors()) is None
