"""Resident memory: the peak is measurable, the pages of a GGUF mapping can be given back once copied,
the C allocator can keep freed blocks to serve the next ones without page faults, and the weights a
decode step streams can sit on transparent huge pages."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from qwen2.memory import HUGE_PAGE, drop_mapped_pages, onto_huge_pages, peak_rss_mib, reset_peak_rss

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


def mapping_of(address: int) -> tuple[int, int, dict[str, str]]:
    """(start, end, fields) of this process's mapping that holds `address`, from /proc/self/smaps."""
    inside, fields = None, {}
    for line in Path("/proc/self/smaps").read_text().splitlines():
        first = line.split(maxsplit=1)[0]
        if not first.endswith(":"):  # a mapping's own line: "start-end perms offset ..."
            if inside:
                break
            low, high = (int(x, 16) for x in first.split("-"))
            inside = (low, high) if low <= address < high else None
        elif inside:
            fields[first[:-1]] = line.split(":", 1)[1].strip()
    assert inside is not None, hex(address)
    return (*inside, fields)


def huge_pages_enabled() -> bool:
    setting = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return setting.exists() and "[never]" not in setting.read_text()


class Holder(nn.Module):
    def __init__(self, packed: torch.Tensor):
        super().__init__()
        self.register_buffer("packed", packed)


def test_moved_weights_keep_their_values_their_sharing_and_sit_in_one_advised_mapping():
    torch.manual_seed(0)
    tied = Holder(torch.randint(0, 256, (3000, 1000), dtype=torch.uint8))  # the head's and the embedding's table
    model = nn.ModuleList([tied, Holder(tied.packed), Holder(torch.randn(513, 7)), Holder(torch.randn(5))])
    model.append(nn.Linear(3, 3))  # no buffer by that name: left alone
    before = [h.packed.clone() for h in model[:4]]
    old_table = tied.packed.data_ptr()
    moved = onto_huge_pages(model)
    assert moved >= sum(t.numel() * t.element_size() for t in before[1:])
    assert all(torch.equal(h.packed, b) for h, b in zip(model[:4], before))
    assert model[0].packed is model[1].packed and model[0].packed.data_ptr() != old_table  # still one table
    addresses = sorted(h.packed.data_ptr() for h in model[:4])
    assert addresses[0] % HUGE_PAGE == 0 and all(a % 64 == 0 for a in addresses)
    start, end, fields = mapping_of(addresses[0])
    assert start <= addresses[-1] < end  # one mapping
    if huge_pages_enabled():  # advised ("hg"), and over 2 MiB: room for a huge page
        assert "hg" in fields["VmFlags"].split() and fields.get("THPeligible") == "1", fields
    model[2].packed.add_(1)  # a private mapping: writable, and written only here
    assert torch.allclose(model[2].packed, before[2] + 1)


def test_a_large_matrix_moves_without_a_second_copy_at_the_peak():
    model = Holder(torch.ones(128 << 20, dtype=torch.uint8))  # as the 0.5B's output head, 145 MB
    reset_peak_rss()
    base = peak_rss_mib()
    onto_huge_pages(model)
    assert peak_rss_mib() - base < 64  # its old pages go back as the copy proceeds, 16 MiB at a time
    assert int(model.packed.sum()) == 128 << 20


def test_a_loaded_block_model_streams_its_repacked_weights_from_one_mapping(default_gguf):
    from qwen2.loading import load_model
    from qwen2.quant.blocks import kernels_available

    if not kernels_available():
        pytest.skip("the GGUF kernels cannot be built on this machine: no repacked weights to move")
    net, _ = load_model(default_gguf)
    addresses = sorted({m.packed.data_ptr() for m in net.modules() if hasattr(m, "packed")})
    assert len(addresses) == 24 * 7 + 1  # every layer's seven matrices and the tied head
    start, end, _ = mapping_of(addresses[0])
    assert start <= addresses[-1] < end
