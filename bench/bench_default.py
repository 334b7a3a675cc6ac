"""Load time, prefill and decode speed of our engine on the default model (batch 1).

    python bench/bench_default.py [--dtype auto|float32|bfloat16] [--quant auto|none|int8|int4] [--model PATH]

Prints the configuration, a table of medians, and one JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from qwen2 import load
from qwen2.device import cpu_has_native_bf16
from qwen2.engine.sampling import SamplingParams

PROSE = ("The history of computing is a story of abstraction: each generation of engineers hides the "
         "details of the one before behind a simpler interface, and builds upward from there. ")


def prompt_of(tokenizer, n: int) -> list[int]:
    ids = tokenizer.encode(PROSE * (n // 10))
    assert len(ids) >= n, "prose too short for the prompt length"
    return ids[:n]


def timed_run(llm, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode tokens/s) for one request."""
    engine = llm.engine
    engine.clear_prefix_cache()
    request = engine.submit(prompt, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))
    start = time.perf_counter()
    first = None
    for _ in engine.stream(request):
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return first - start, (len(request.output) - 1) / (end - first)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--quant", default="auto", choices=["auto", "none", "int8", "int4"])
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    loads = []
    for _ in range(2):  # the first load may include fetching and page-cache warm-up
        start = time.perf_counter()
        llm = load(args.model, dtype=args.dtype, max_slots=1, max_seq_len=args.prompt_tokens + args.new_tokens + 8,
                   prefill_chunk=args.prompt_tokens, quant=args.quant)
        loads.append(time.perf_counter() - start)
    prompt = prompt_of(llm.tokenizer, args.prompt_tokens)
    timed_run(llm, prompt[:32], 4)  # warm-up
    prefill, decode = zip(*(timed_run(llm, prompt, args.new_tokens) for _ in range(args.runs)))
    result = {
        "load_s_first": round(loads[0], 2), "load_s_warm": round(loads[1], 2),
        "prefill_tps": round(args.prompt_tokens / statistics.median(prefill), 1),
        "decode_tps": round(statistics.median(decode), 2),
        "dtype": str(llm.model.model.embed_tokens.weight.dtype).removeprefix("torch."), "quant": args.quant,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(), "native_bf16": cpu_has_native_bf16(),
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "runs": args.runs,
    }
    print(f"model: {args.model or 'default (Qwen2.5-Coder-0.5B-Instruct Q4_K_M)'}; dtype {result['dtype']}; "
          f"quant {args.quant}; "
          f"{result['threads']} threads; torch {result['torch']}; native bf16: {result['native_bf16']}")
    print(f"load (warm)       {result['load_s_warm']:8.2f} s   (first: {result['load_s_first']} s)")
    print(f"prefill {args.prompt_tokens:>4} tok  {result['prefill_tps']:8.1f} tok/s")
    print(f"decode  {args.new_tokens:>4} tok  {result['decode_tps']:8.2f} tok/s (batch 1)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
