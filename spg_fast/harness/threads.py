"""How many threads torch uses for a run on the CPU. Measured on this project's 2-core machine
(docs/harness.md, "Threads"): a second thread gains little for the small networks (the MLPs) and,
when another process keeps a core busy, makes every parallel region wait for a descheduled thread
(a digits run took 91 s with torch's default 2 threads against 11.7 s with one). So: one thread
for networks under ``SMALL`` parameters; otherwise the cores this process may run on
(``os.sched_getaffinity``) less the load average of the last minute, rounded, at least one. An
explicit count (``--threads``), ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` in the environment, or
a count set with ``torch.set_num_threads`` before the run, is kept: a count that is neither of the
two torch starts with (the cores this process may run on, or the physical cores among them, where
torch counts a hyperthreaded core once)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

SMALL = 1_000_000  # parameters
ENVIRONMENT = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def physical_cores() -> int | None:
    """The physical cores among those this process may run on (hyperthreads of one core counted
    once), from Linux's CPU topology; None where it cannot be read."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    found = set()
    for cpu in os.sched_getaffinity(0):
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            package = (topology / "physical_package_id").read_text().strip()
            core = (topology / "core_id").read_text().strip()
        except OSError:
            return None
        found.add((package, core))
    return len(found) or None


def choose(parameters: int, requested: int | None = None) -> tuple[int, str]:
    """(threads, why) for a run of a network of ``parameters`` on the CPU."""
    if requested is not None:
        return requested, "--threads"
    for name in ENVIRONMENT:
        if name in os.environ:
            return torch.get_num_threads(), name
    if torch.get_num_threads() not in (cores(), physical_cores()):
        return torch.get_num_threads(), "torch.set_num_threads"
    if parameters < SMALL:
        return 1, f"a network under {SMALL:,} parameters"
    load = os.getloadavg()[0]
    free = max(1, min(cores(), math.floor(cores() - load + 0.5)))
    return free, f"{cores()} cores, load average {load:.2f}"
