"""One prompt's prefill through the engine, timed and profiled: where a prefill's milliseconds go.

    python bench/prefill_profile.py [--model M] [--quant auto] [--tokens 512] [--profile]

Prints the median of five cold prefills (prefix cache cleared, one reply token) and, with
--profile, torch.profiler's table of one more. `qwen2 bench` gives the side-by-side ratios.
"""

from __future__ import annotations

import argparse
import time

import torch

from qwen2.engine.sampling import SamplingParams
from qwen2.loading import load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--quant", default="auto")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    llm = load(args.model, quant=args.quant, prefill_chunk=args.tokens, ctx=args.tokens + 64)
    prompt = torch.randint(1000, 30000, (args.tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)

    def prefill() -> float:
        llm.engine.clear_prefix_cache()
        start = time.perf_counter()
        llm.engine.run_all([prompt], [params])
        return time.perf_counter() - start

    prefill()
    median = sorted(prefill() for _ in range(5))[2]
    print(f"{args.model} [{llm.quant}], {args.threads} threads: prefill {args.tokens} in {median * 1e3:.1f} ms, "
          f"{args.tokens / median:.0f} tok/s")
    if args.profile:
        with torch.profiler.profile() as profile:
            prefill()
        print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
