"""Peak resident memory of this process, resettable so each measurement gets its own peak.

On Linux, writing 5 to /proc/self/clear_refs resets the high-water mark (VmHWM) that
/proc/self/status reports. Elsewhere the peak is getrusage's, which covers the whole life
of the process and cannot be reset: a later, smaller measurement then shows the earlier peak.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path


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
