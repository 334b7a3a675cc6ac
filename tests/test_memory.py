"""Resident memory: the peak is measurable, the pages of a GGUF mapping can be given back once copied, and
the C allocator can keep freed blocks to serve the next ones without page faults."""

from __future__ import annotations

import platform
import subprocess
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


FAULTS_OF_LATER_STEPS = """
import resource, sys, torch
from qwen2.memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
faults = []
for step in range(10):  # blocks of 64, 32, 16 and 48 MB held together, then freed, as a training step's
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    held = [torch.ones(n << 20) for n in (16, 8, 4, 12)]
    del held
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
print(sum(faults[7:]))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="sets glibc's malloc")
def test_kept_freed_memory_serves_later_steps_with_few_page_faults():
    # in processes of their own: the setting lasts for the whole process
    def faults(mode: str) -> int:
        run = subprocess.run([sys.executable, "-c", FAULTS_OF_LATER_STEPS, mode], capture_output=True, text=True,
                             check=True)
        return int(run.stdout.split()[-1])

    assert faults("default") > 3 * 20_000  # each step maps its 160 MB afresh: a fault per 4 KiB page
    # the first steps still grow the heap (a block that fits no hole yet); by the 8th every block finds one
    assert faults("keep") < 1_000
