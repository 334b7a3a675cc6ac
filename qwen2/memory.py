"""Peak resident memory of this process, resettable so each measurement gets its own peak;
`drop_mapped_pages`, which gives back the pages of a read-only file mapping once they are copied;
and `keep_freed_memory`, which makes the C allocator reuse what torch frees (training's steps).

On Linux, writing 5 to /proc/self/clear_refs resets the high-water mark (VmHWM) that
/proc/self/status reports. Elsewhere the peak is getrusage's, which covers the whole life
of the process and cannot be reset: a later, smaller measurement then shows the earlier peak.
"""

from __future__ import annotations

import ctypes
import mmap
import platform
import resource
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

MADV_DONTNEED = 4
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep the memory torch frees for its next allocations instead of giving it
    back to the system; True where it took (glibc only).

    A training step allocates and frees gigabytes: activations, autocast's bf16 copies of the weights,
    their gradients. glibc serves large blocks with mmap and unmaps them on free, so every step's were
    fresh pages, each faulted in and zeroed by the kernel: at Qwen2-0.5B's size 855K page faults, half
    of a 4.9 s step (bench/RESULTS.md). With no mmap'd blocks and no trimming the heap is reused and a
    step faults no page; the peak is ~0.9 GB higher there (a freed block does not always fit the next)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


def drop_mapped_pages(t: torch.Tensor) -> None:
    """Unmap the whole pages under `t` from this process (madvise MADV_DONTNEED); a later read of
    them faults them back in from the file. Only for a file mapped copy-on-write and never written
    (GGUF blocks, qwen2.weights.gguf): there they cost resident memory while their repacked copy is
    what the model reads. Elsewhere (anonymous memory) it would zero the data, so callers must know."""
    if sys.platform != "linux" or t.numel() == 0:
        return
    page = mmap.PAGESIZE
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    first, last = -(-start // page) * page, end // page * page
    if last > first:
        ctypes.CDLL(None, use_errno=True).madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED)
