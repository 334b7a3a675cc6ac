"""One optimizer step over every weight of a Qwen2 size (float32, tied embedding once): torch's fused
AdamW beside OnDARE (our compiled step, and its torch ops) and OnTIES, each with a tau for every tensor.

    python bench/merging_step.py [--preset Qwen2-0.5B] [--steps 3] [--reserve-rate 0.1] [--json out.json]

Parameters, gradients and tau are random: the time of a step does not depend on their values. Each
optimizer steps once to warm up, then --steps times; the median is reported, with its ratio to AdamW's.
A step reads and writes the parameter and both moments and reads the gradient (and tau): at least 28
(32) bytes a weight, the floor the memory bandwidth sets.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_step import cpu_name  # noqa: E402

from qwen2.config import Qwen2Config  # noqa: E402
from qwen2.model import Transformer  # noqa: E402
from qwen2.train.merging_optimizer import OnlineMergingAdamW  # noqa: E402


def shapes(preset: str) -> list[torch.Size]:
    with torch.device("meta"):
        model = Transformer(Qwen2Config.from_preset(preset))
    return [p.shape for p in model.parameters()]


def time_steps(make, sizes: list[torch.Size], steps: int) -> float:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(size)) for size in sizes]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = make(params)
    optimizer.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    del optimizer, params
    gc.collect()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="Qwen2-0.5B")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--reserve-rate", type=float, default=0.1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sizes = shapes(args.preset)
    weights = sum(s.numel() for s in sizes)
    p = args.reserve_rate

    def merging(method: str, compiled: bool = True):
        def make(params):
            taus = [torch.randn_like(x) * 1e-3 for x in params]
            optimizer = OnlineMergingAdamW(params, taus, method=method, lr=1e-5, reserve_rate=p, alpha=1e-7)
            if not compiled:
                optimizer.kernel = None
            return optimizer
        return make

    rows = {"adamw (torch, fused)": lambda params: torch.optim.AdamW(params, lr=1e-5, fused=True),
            "ondare (compiled)": merging("ondare"),
            "ondare (torch ops)": merging("ondare", compiled=False),
            "onties (torch ops)": merging("onties")}
    result = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "preset": args.preset, "weights": weights,
              "reserve_rate": p, "steps": args.steps, "seconds": {}}
    for name, make in rows.items():
        seconds = time_steps(make, sizes, args.steps)
        result["seconds"][name] = round(seconds, 3)
        adamw = result["seconds"]["adamw (torch, fused)"]
        print(f"{name:22s} {seconds:8.3f} s  {seconds / adamw:5.2f}x AdamW  "
              f"{weights * 28 / seconds / 1e9:5.1f} GB/s at 28 bytes a weight", flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
