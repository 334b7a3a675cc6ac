"""Peak resident memory of this process, resettable so each measurement gets its own peak;
`drop_mapped_pages`, which gives back the pages of a read-only file mapping once they are copied;
`keep_freed_memory`, which makes the C allocator reuse what torch frees (training's steps); and
`onto_huge_pages`, which moves the weights a decode step streams onto transparent huge pages.

On Linux, writing 5 to /proc/self/clear_refs resets the high-water mark (VmHWM) that
/proc/self/status reports. Elsewhere the peak is getrusage's, which covers the whole life
of the process and cannot be reset: a later, smaller measurement then shows the earlier peak.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import platform
import resource
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

MADV_DONTNEED = 4
HUGE_PAGE = 2 << 20  # x86-64's and arm64's transparent huge page
MOVE_CHUNK = 16 << 20
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep the memory torch frees for its next allocations instead of giving it
    back to the system; True where it took (glibc only).

    A training step allocates and frees gigabytes: activations, autocast's bf16 copies of the weights,
    their gradients. glibc serves large blocks with mmap and unmaps them on free, so every step's were
    fresh pages, each faulted in and zeroed by the kernel: at Qwen2-0.5B's size 855K page faults, half
    of a 4.9 s step (bench/RESULTS.md). With no mmap'd blocks and no trimming the heap is reused and a
    step faults no page; the peak is ~0.9 GB higher there (a freed block does not always fit the next)."""
    if not _glibc():
        return False
    return bool(_libc().mallopt(M_MMAP_MAX, 0)) and bool(_libc().mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


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
    them faults them back in from the file. For a file mapped copy-on-write and never written
    (GGUF blocks, qwen2.weights.gguf): there they cost resident memory while their repacked copy is
    what the model reads. In anonymous memory it zeroes the data: only for memory nothing reads again
    (`onto_huge_pages`' copied matrices)."""
    if sys.platform != "linux" or t.numel() == 0:
        return
    page = mmap.PAGESIZE
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    first, last = -(-start // page) * page, end // page * page
    if last > first:
        _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED)


def onto_huge_pages(model: nn.Module, buffer: str = "packed") -> int:
    """Move every module's `buffer` tensor into one anonymous mapping advised for transparent huge
    pages (Linux; elsewhere nothing moves); returns the bytes moved.

    A decode step streams every weight once. On 4 KiB pages that is a TLB miss each 4 KiB and its
    page walk; the repacked matrices, each its own allocation (most under 2 MiB at 0.5B's size), got
    no huge pages where the kernel's setting is `madvise`, the common default. Gathered into one
    advised mapping, a 0.5B batch-1 decode step measured 22 -> 18 ms (one mapping without the advice:
    21.5; bench/RESULTS.md). Call it before anything keeps a reference to the old tensors; tensors
    shared by modules stay shared."""
    import torch

    advise = getattr(mmap, "MADV_HUGEPAGE", None)
    owners: dict[tuple, list[nn.Module]] = {}
    for m in model.modules():
        t = getattr(m, buffer, None)
        if isinstance(t, torch.Tensor) and t.is_contiguous() and t.device.type == "cpu":
            owners.setdefault(_key(t), []).append(m)
    if advise is None or not owners:
        return 0
    sizes = {key: -(-key[1] * key[2].itemsize // 64) * 64 for key in owners}
    total = sum(sizes.values())
    area = mmap.mmap(-1, total + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = -_address(area) % HUGE_PAGE
    try:
        area.madvise(advise, start, total)
    except OSError:  # a kernel built without transparent huge pages: the move gains nothing and costs nothing
        pass
    arena = torch.frombuffer(area, dtype=torch.uint8)[start:start + total]  # holds `area` while any view lives
    at = 0
    for key, modules in owners.items():  # one matrix at a time, each old one given back before the next moves
        old = getattr(modules[0], buffer)
        flat_old, flat_new = old.view(-1).view(torch.uint8), arena[at:at + key[1] * key[2].itemsize]
        # a whole storage of its own (a 145 MB output head, say) is given back as it is copied: the
        # peak would otherwise hold both copies of it
        alone = old.untyped_storage().nbytes() == flat_old.numel()
        for i in range(0, flat_old.numel(), MOVE_CHUNK):
            flat_new[i:i + MOVE_CHUNK].copy_(flat_old[i:i + MOVE_CHUNK])
            if alone:
                drop_mapped_pages(flat_old[i:i + MOVE_CHUNK])
        new = flat_new.view(old.dtype).view(old.shape)
        for m in modules:
            m._buffers[buffer] = new
        del old, flat_old, new
        if _glibc():  # glibc keeps a freed heap block's pages; the peak would hold both copies
            _libc().malloc_trim(0)
        at += sizes[key]
    return total


@functools.cache
def _libc() -> ctypes.CDLL:
    """The C library this process runs on: madvise, and glibc's mallopt and malloc_trim."""
    return ctypes.CDLL(None, use_errno=True)


@functools.cache
def _glibc() -> bool:
    return platform.libc_ver()[0] == "glibc"


def _key(t: torch.Tensor) -> tuple:
    return t.data_ptr(), t.numel(), t.dtype


def _address(area: mmap.mmap) -> int:
    """The address of a writable mapping's first byte."""
    return ctypes.addressof(ctypes.c_char.from_buffer(area))
