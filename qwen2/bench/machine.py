"""Facts about the machine the bench runs on: the CPU, package versions, memory read bandwidth,
and how busy other processes kept the cores."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import resource
import time
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def memory_bandwidth_gbs(threads: int, gib: float = 1.0, repeats: int = 5) -> float:
    """Read bandwidth (GB/s) of summing a tensor far larger than the caches, best of `repeats`."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)  # touched: every page is resident
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best / 1e9


def cpu_busy_seconds() -> float:
    """CPU-seconds the whole machine has spent busy since boot (all processes, all cores)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def children_cpu_seconds() -> float:
    """CPU-seconds this process's finished children have used."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
