"""One subprocess per row (an engine variant), so its peak RSS, imports and threads are its own.

The parent writes the row's spec to a file; the child runs the peer's runner and writes back its
result, or why the peer is missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from qwen2.bench.machine import children_cpu_seconds, cpu_busy_seconds
from qwen2.bench.peers import RUNNERS

# Testing hook: module names the children treat as not installed (see tests/test_bench.py).
HIDE_ENV = "QWEN2_BENCH_HIDE"
CHILD = "import sys; from qwen2.bench.rows import child_main; child_main(sys.argv[1])"


def run_row(spec: dict[str, Any], threads: int, timeout: float) -> dict[str, Any]:
    """Run one row in a child process; its result, with how busy other processes kept the cores."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = spec | {"result": str(Path(tmp) / "result.json")}
        (Path(tmp) / "spec.json").write_text(json.dumps(spec))
        env = os.environ | {"OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
        cmd = [sys.executable, "-c", CHILD, str(Path(tmp) / "spec.json")]
        # Other processes' CPU use during the row: the machine's busy time minus the child's own.
        # On a shared machine it explains a slow row (torch's thread pool suffers most from it).
        busy, own, wall = cpu_busy_seconds(), children_cpu_seconds(), time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"missing": f"failed: ran past {timeout:.0f} s"}
        others = (cpu_busy_seconds() - busy) - (children_cpu_seconds() - own)
        if proc.returncode == 0 and Path(spec["result"]).exists():
            result = json.loads(Path(spec["result"]).read_text())
            return result | {"other_cpu_cores": round(max(others, 0.0) / (time.perf_counter() - wall), 2)}
        said = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        return {"missing": f"failed ({how}): {said}"}


def child_main(spec_path: str) -> None:
    """Entry of a row's subprocess: read the spec, run, write the result (or why it's missing)."""
    for name in filter(None, os.environ.get(HIDE_ENV, "").split(",")):
        sys.modules[name] = None  # `import name` now raises ImportError, as if it were not installed
    spec = json.loads(Path(spec_path).read_text())
    try:
        result = RUNNERS[spec["peer"]](spec)
    except ImportError as e:  # ModuleNotFoundError included: the peer can't run here
        result = {"missing": f"not available: {e} (pip install 'qwen2[bench]')"}
    Path(spec["result"]).write_text(json.dumps(result))


def prime_quantized_cache(model: Path, quant: str) -> None:
    """One start in a throwaway process, so the measured starts find the quantized weights cached
    (qwen2.weights.quantized), as a user's second start does, and the row's peak RSS is a warm start's."""
    # load_model is the part of load() that writes the cache; no engine, so no KV cache to allocate
    code = f"from qwen2.loading import load_model; load_model({str(model)!r}, quant={quant!r})"
    subprocess.run([sys.executable, "-c", code], capture_output=True, check=False)
