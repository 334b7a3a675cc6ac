"""`qwen2 merge` wall time and memory beside the size of what it merges.

    python bench/merge_memory.py --base HF_FOLDER [--models 2] [--method ties] [--density 0.5] [--json out.json]

Makes --models fine-tunes of --base (each tensor plus small Gaussian noise, written tensor by
tensor into a scratch folder), then runs `qwen2 merge --method M --base B FT... --out OUT` in a
child process and samples its memory every 10 ms (and, for comparison, a child that only
imports the merge code): peak anonymous memory (RssAnon: what the
merge itself holds) and peak RSS (VmHWM, which also counts the pages of the memory-mapped
inputs the kernel has not yet dropped). Prints them beside the inputs' total size, the largest
tensor and the wall time, and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from qwen2.train.merge_io import Source, copy_side_files, plan_shards, write_shard


def make_fine_tune(base: Path, out: Path, seed: int, scale: float = 1e-3) -> None:
    out.mkdir(parents=True)
    with ExitStack() as stack:
        source = Source(base, "base", stack)
        generator = torch.Generator().manual_seed(seed)

        def noisy(name: str) -> torch.Tensor:
            t = source.tensor(name)
            noise = torch.randn(t.shape, generator=generator) * scale
            return (t.float() + noise).to(t.dtype)

        entries = [(n, source.dtypes[n], source.shapes[n]) for n in source.names]
        for filename, group in plan_shards(entries, 5 * 10**9).items():
            write_shard(out / filename, group, noisy, lambda: None)
        (out / "config.json").write_text(json.dumps(source.config))
        copy_side_files(base, out)


def status_kib(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith(field + ":")), 0)
    except FileNotFoundError:
        return 0


def run_sampled(command: list[str]) -> tuple[float, int, int]:
    """(seconds, peak RssAnon KiB, peak VmHWM KiB) of a child process; exits on its failure."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, text=True)
        peak_anon = peak_rss = 0
        while child.poll() is None:
            peak_anon = max(peak_anon, status_kib(child.pid, "RssAnon"))
            peak_rss = max(peak_rss, status_kib(child.pid, "VmHWM"))
            time.sleep(0.01)
        if child.returncode != 0:
            log.seek(0)
            sys.exit(f"{command[2:4]} failed (exit {child.returncode}): {log.read()[-2000:]}")
    return time.perf_counter() - start, peak_anon, peak_rss


def cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.machine())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--models", type=int, default=2)
    parser.add_argument("--method", default="ties")
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="merge-bench-", dir=args.base.parent) as scratch:
        fine_tunes = [Path(scratch, f"ft{i}") for i in range(args.models)]
        for i, folder in enumerate(fine_tunes):
            make_fine_tune(args.base, folder, seed=i)
        density = ["--density", str(args.density)] if args.method in ("ties", "dare_linear", "dare_ties") else []
        command = [sys.executable, "-m", "qwen2", "merge", "--method", args.method, "--base", str(args.base),
                   *map(str, fine_tunes), *density, "--out", str(Path(scratch, "merged"))]
        # the same imports without merging: the interpreter's own share of the peaks
        _, idle_anon, idle_rss = run_sampled([sys.executable, "-c", "import qwen2.train.merge, time; time.sleep(1)"])
        seconds, peak_anon, peak_rss = run_sampled(command)
        with ExitStack() as stack:
            source = Source(args.base, "base", stack)
            sizes = [source.dtypes[n].itemsize * math.prod(source.shapes[n]) for n in source.names]
    inputs, largest = sum(sizes) * (args.models + 1), max(sizes)
    result = dict(method=args.method, density=args.density, models=args.models, base=str(args.base),
                  input_mib=round(inputs / 2**20), largest_tensor_mib=round(largest / 2**20, 1),
                  seconds=round(seconds, 1), peak_anon_mib=round(peak_anon / 1024), peak_rss_mib=round(peak_rss / 1024),
                  imports_anon_mib=round(idle_anon / 1024), imports_rss_mib=round(idle_rss / 1024), cpu=cpu_name(),
                  torch=torch.__version__)
    print(f"| inputs | largest tensor | wall | peak anonymous (imports alone) | peak RSS (imports alone) |\n"
          f"|---|---|---|---|---|\n| {result['input_mib']:,} MiB ({args.models + 1} checkpoints) | "
          f"{result['largest_tensor_mib']} MiB | {result['seconds']} s | {result['peak_anon_mib']:,} MiB "
          f"({result['imports_anon_mib']:,}) | {result['peak_rss_mib']:,} MiB ({result['imports_rss_mib']:,}) |")
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
