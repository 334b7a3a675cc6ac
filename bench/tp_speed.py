"""Tensor-parallel speed on this machine: prefill and decode of the default model, alone or sharded.

    python bench/tp_speed.py [--quant none|int8] [--prompt 512] [--tokens 32]
    torchrun --nproc-per-node 2 bench/tp_speed.py [same options]

Rank 0 prints one JSON line: prefill tokens/s (one prompt through the engine) and greedy decode
tokens/s (batch 1), the world size, torch threads per process, the CPU and the load average;
under torchrun also the latency of one all-reduce of a token's hidden state (a decode step
of the 0.5B makes 50 collectives: two all-reduces per layer, the embedding's, the logits'
all-gather). Each run loads the model as `qwen2 generate` does (quant auto is int8 on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
import torch.distributed as dist

from qwen2.distributed.tensor_parallel import collective_timeout, world_size
from qwen2.engine.sampling import SamplingParams
from qwen2.loading import load

HIDDEN = 896  # the default model's hidden size


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def all_reduce_us(rounds: int = 300) -> float | None:
    """Microseconds per gloo all-reduce of one token's hidden state (every rank runs this before loading)."""
    if world_size() == 1:
        return None
    dist.init_process_group("gloo", timeout=collective_timeout())  # load() then uses this group
    x = torch.zeros(1, HIDDEN)
    for _ in range(20):
        dist.all_reduce(x)
    start = time.perf_counter()
    for _ in range(rounds):
        dist.all_reduce(x)
    return round((time.perf_counter() - start) / rounds * 1e6, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quant", default="auto")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    parser.add_argument("--tokens", type=int, default=32, help="decoded tokens")
    args = parser.parse_args()
    latency = all_reduce_us()
    llm = load(quant=args.quant, ctx=args.prompt + args.tokens + 8, max_concurrency=1, prefill_chunk=args.prompt)
    words = llm.tokenizer.encode("def quicksort(arr):\n    return sorted(arr)\n" * 200)
    prompt = words[: args.prompt]
    llm.generate("import os\n" * 20, max_tokens=2, temperature=0)  # warm-up; shares no block with the prompt
    request = llm.engine.submit(prompt, SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True))
    start = time.perf_counter()
    stamps = [time.perf_counter() for out in llm.engine.stream(request) if out.token is not None]
    first = stamps[0] - start
    decode = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    print(json.dumps({"world_size": world_size(), "quant": args.quant,
                      "threads_per_process": torch.get_num_threads(), "prompt_tokens": len(prompt),
                      "prefill_tok_s": round(len(prompt) / first, 1), "decode_tok_s": round(1 / decode, 2),
                      "decoded": len(stamps), "all_reduce_us": latency, "cpu": cpu_name(),
                      "loadavg": os.getloadavg()}), flush=True)


if __name__ == "__main__":
    main()
