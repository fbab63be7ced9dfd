"""The thread rule: one thread for small networks, the free cores (this process's cores less the
load average) otherwise; --threads, OMP_NUM_THREADS / MKL_NUM_THREADS and a count set with
torch.set_num_threads win; a run restores torch's count afterwards and records its choice."""

from __future__ import annotations

import os

import pytest
import torch

from spg_fast.harness import run, threads


@pytest.fixture
def machine(monkeypatch):
    """4 cores, no thread variables, torch at its default count; returns a load setter."""
    for name in threads.ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(threads, "physical_cores", lambda: 4)
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    load = [0.0]
    monkeypatch.setattr(os, "getloadavg", lambda: (load[0], 0.0, 0.0))
    yield load
    torch.set_num_threads(before)


def test_small_networks_get_one_thread(machine):
    assert threads.choose(999_999) == (1, "a network under 1,000,000 parameters")


@pytest.mark.parametrize("load, count", [(0.0, 4), (0.4, 4), (1.6, 2), (3.5, 1), (9.0, 1)])
def test_large_networks_get_the_free_cores(machine, load, count):
    machine[0] = load
    assert threads.choose(5_000_000) == (count, f"4 cores, load average {load:.2f}")


def test_explicit_counts_win(machine, monkeypatch):
    assert threads.choose(10, requested=3) == (3, "--threads")
    torch.set_num_threads(2)
    assert threads.choose(5_000_000) == (2, "torch.set_num_threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.choose(10) == (2, "OMP_NUM_THREADS")


def test_a_run_records_its_threads_and_restores_torchs(monkeypatch):
    for name in threads.ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    before = torch.get_num_threads()
    seen = []
    real = threads.choose
    monkeypatch.setattr(
        "spg_fast.harness.api.choose_threads", lambda *a: seen.append(real(*a)) or seen[-1]
    )
    result = run("digits", "finetune", config={"max_epochs": 1}, tasks=1, progress="none")
    assert result["threads"] == {"count": seen[0][0], "why": seen[0][1]}
    assert torch.get_num_threads() == before
    result = run(
        "digits", "finetune", config={"max_epochs": 1}, tasks=1, progress="none", threads=2
    )
    assert (
        result["threads"] == {"count": 2, "why": "--threads"} and torch.get_num_threads() == before
    )


def test_torchs_default_on_hyperthreaded_cores_is_not_taken_for_a_choice(machine, monkeypatch):
    """torch starts with one thread per physical core where the 4 CPUs are 2 cores' hyperthreads:
    that count is its default, not the user's; another count is the user's."""
    monkeypatch.setattr(threads, "physical_cores", lambda: 2)
    torch.set_num_threads(2)
    assert threads.choose(999_999) == (1, "a network under 1,000,000 parameters")
    torch.set_num_threads(3)
    assert threads.choose(999_999) == (3, "torch.set_num_threads")


@pytest.mark.skipif(not os.path.exists("/sys/devices/system/cpu/cpu0/topology"), reason="Linux")
def test_physical_cores_counts_each_core_of_this_machine_once():
    count = threads.physical_cores()
    assert count is not None and 1 <= count <= threads.cores()
