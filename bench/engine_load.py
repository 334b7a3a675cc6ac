"""serve_load.py's load on the engine alone, no HTTP: what the engine itself gives N clients.

    .venv/bin/python bench/engine_load.py [--model M] [--clients 1 32] [--requests 192]

Each of N clients keeps one request in flight (serve_load's chat prompt, greedy, replies of a
seeded 16..64 tokens with the end tokens banned, the server's repetition_penalty 1.05); a finished
request is replaced until --requests have run. Prints, per N, tokens/s and the median and p90
step times; ends with one JSON line. Beside serve_load.py's numbers it says how much of a gap
lies in the engine's steps and how much in the server around them.
"""

from __future__ import annotations

import argparse
import json
import random
import time

from qwen2.engine.sampling import SamplingParams
from qwen2.loading import load

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."  # serve_load's
END_TOKENS = {151643: -100.0, 151645: -100.0}


def run(llm, clients: int, requests: int) -> dict:
    engine, rng = llm.engine, random.Random(0)
    submitted = 0

    def submit() -> None:
        nonlocal submitted
        text = llm.tokenizer.apply_chat_template([{"role": "user", "content": f"[{submitted}] {PROMPT}"}])
        engine.submit(text, SamplingParams(temperature=0, max_tokens=rng.randint(16, 64), logit_bias=END_TOKENS,
                                           repetition_penalty=1.05))
        submitted += 1

    for _ in range(min(clients, requests)):
        submit()
    steps, tokens, start = [], 0, time.perf_counter()
    while engine.has_work:
        tick = time.perf_counter()
        outputs = engine.step()
        steps.append(time.perf_counter() - tick)
        tokens += sum(o.token is not None for o in outputs)
        for _ in range(sum(o.finish_reason is not None for o in outputs)):
            if submitted < requests:
                submit()
    wall = time.perf_counter() - start
    steps.sort()
    return {"clients": clients, "requests": requests, "tokens": tokens, "wall_s": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 1), "step_p50_ms": round(steps[len(steps) // 2] * 1e3, 1),
            "step_p90_ms": round(steps[int(len(steps) * 0.9)] * 1e3, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the default model")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--requests", type=int, default=192)
    args = parser.parse_args()
    llm = load(args.model, max_concurrency=max(args.clients))
    rows = []
    for clients in args.clients:
        # a lone client runs a sixth of the requests, as many as each of 32 clients does with 192
        rows.append(run(llm, clients, args.requests if clients > 1 else max(1, args.requests // 32)))
        print(rows[-1], flush=True)
        llm.engine.clear_prefix_cache()
    if len(rows) > 1:
        print(f"{rows[-1]['clients']} clients: {rows[-1]['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}x "
              f"{rows[0]['clients']} client's tokens/s")
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
