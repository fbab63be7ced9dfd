"""Free memory on a device, for sizing work buffers."""

from __future__ import annotations

import os

import torch


def free_bytes(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device``; None where it cannot be told.

    On a CUDA device, what the driver reports free plus what torch's caching allocator holds unused;
    on the CPU, the kernel's estimate of available memory (``MemAvailable`` on Linux, available
    pages elsewhere on POSIX).
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None
