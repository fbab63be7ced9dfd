"""Timing that holds up: warm-up, medians over many repeats, inputs rotated so caches do not serve
them, and the device's measured streaming bandwidth (``stream_bandwidth``) as the yardstick."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def cache_bytes(device: torch.device) -> int:
    """Last-level cache size: the GPU's L2, or the CPU's L3 from sysfs (32 MiB if unknown)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    for index in (3, 2):
        path = Path(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size")
        if path.exists():
            text = path.read_text().strip()
            return (
                int(text[:-1]) * (1024 if text.endswith("K") else 1024**2)
                if text[-1] in "KM"
                else int(text)
            )
    return 32 * 1024**2


def copies_to_rotate(working_set: int, device: torch.device, budget: int) -> int:
    """How many copies of the inputs make their total at least 3x the last-level cache (within
    ``budget`` bytes)."""
    want = math.ceil(3 * cache_bytes(device) / max(working_set, 1))
    return max(1, min(want, budget // max(working_set, 1), 64))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(
    fns: list[Callable[[], object]],
    device: torch.device,
    min_repeats: int = 10,
    min_time: float = 0.2,
) -> float:
    """Median time of one call, cycling through ``fns`` (one per rotated input copy): CUDA events on
    a GPU, perf_counter on the CPU; at least ``min_repeats`` calls and ``min_time`` seconds
    after 3 warm-up rounds."""
    for fn in fns * 3:
        fn()
    sync(device)
    times: list[float] = []
    spent = 0.0
    i = 0
    while len(times) < min_repeats or spent < min_time:
        fn = fns[i % len(fns)]
        i += 1
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            t = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            fn()
            t = time.perf_counter() - t0
        times.append(t)
        spent += t
        if len(times) >= 2000:
            break
    return statistics.median(times)


def stream_bandwidth(device: torch.device, nbytes: int) -> tuple[float, str]:
    """The device's streaming ceiling in bytes per second (bytes read plus bytes written), and how
    it was measured.

    On a GPU: a large ``copy_``. On the CPU a copy is no ceiling: writing a line the core has not
    read costs a read first (write-allocate), which the bytes model does not count, so in-place ops
    such as the mask measured over 100% of it. There the yardstick is the in-place triad
    ``a += s * b`` over buffers far past the last-level cache with torch's thread count: the access
    pattern of the in-place ops (read two, write one back)."""
    n = nbytes // 4
    a = torch.rand(n, device=device)
    b = torch.rand(n, device=device)
    if device.type == "cuda":
        seconds = median_seconds([lambda: a.copy_(b)], device, min_repeats=20)
        return 2 * nbytes / seconds, "copy"
    seconds = median_seconds([lambda: a.add_(b, alpha=0.5)], device, min_repeats=20)
    return 3 * nbytes / seconds, f"in-place triad a += s*b, {torch.get_num_threads()} threads"
