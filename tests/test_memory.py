"""Resident memory: the peak is measurable, and the pages of a GGUF mapping can be given back once copied."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qwen2.memory import drop_mapped_pages, peak_rss_mib

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status, a Linux file")


def resident_file_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile line")


def test_dropped_pages_leave_this_process_and_read_back_from_the_file(tmp_path):
    size = 64 << 20
    data = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
    (tmp_path / "weights.bin").write_bytes(data.tobytes())
    mapped = torch.from_numpy(np.memmap(tmp_path / "weights.bin", dtype=np.uint8, mode="c"))  # as the GGUF reader maps
    assert int(mapped.sum()) == int(data.sum())  # every page read in
    before = resident_file_kib()
    drop_mapped_pages(mapped[1000:])  # a view that starts inside a page: that page stays
    after = resident_file_kib()
    assert before - after > (size >> 10) * 0.9, (before, after)
    assert torch.equal(mapped, torch.from_numpy(data))  # faulted back in, unchanged
    assert peak_rss_mib() > 0
