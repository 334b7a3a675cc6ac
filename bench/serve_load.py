"""Load test of an OpenAI-compatible server: throughput, time to first token, inter-token latency.

    python bench/serve_load.py --url http://127.0.0.1:8000 [--concurrency 1 8 32] [--max-tokens 64]

Each level runs `--requests-per-client` streamed chat requests per client (bounded), with
ignore_eos so every reply has exactly --max-tokens tokens; prompts differ at their start so the
prefix cache cannot skip them. Works against any OpenAI server (ours, llama.cpp's, vLLM) on this
machine: the URL must be loopback. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import socket
import time
from urllib.parse import urlparse

from openai import AsyncOpenAI

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def loopback_only(url: str) -> None:
    host = urlparse(url).hostname or ""
    addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    if not all(ipaddress.ip_address(a).is_loopback for a in addresses):
        raise SystemExit(f"{url} is not a loopback address; this benchmark only loads servers on this machine")


async def one_request(client: AsyncOpenAI, model: str, index: int, args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    stamps: list[float] = []
    tokens = 0
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": f"[{index}] {PROMPT}"}], max_tokens=args.max_tokens,
        temperature=0, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"ttft": stamps[0] - start if stamps else float("nan"), "gaps": gaps, "tokens": tokens or len(stamps)}


async def run_level(client: AsyncOpenAI, model: str, clients: int, args: argparse.Namespace) -> dict:
    indices = iter(range(clients * args.requests_per_client))  # shared: each client takes the next one

    async def worker() -> list[dict]:
        return [await one_request(client, model, i, args) for i in indices]

    start = time.perf_counter()
    results = [r for batch in await asyncio.gather(*(worker() for _ in range(clients))) for r in batch]
    wall = time.perf_counter() - start
    ttft = [r["ttft"] * 1000 for r in results]
    itl = [g * 1000 for r in results for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "wall_s": round(wall, 2), "output_tokens": tokens,
            "tokens_per_s": round(tokens / wall, 1), "requests_per_s": round(len(results) / wall, 3),
            "ttft_p50_ms": round(percentile(ttft, 50), 1), "ttft_p99_ms": round(percentile(ttft, 99), 1),
            "itl_p50_ms": round(percentile(itl, 50), 1), "itl_p99_ms": round(percentile(itl, 99), 1)}


async def main(args: argparse.Namespace) -> None:
    loopback_only(args.url)
    async with AsyncOpenAI(base_url=args.url.rstrip("/") + "/v1", api_key=args.api_key or "none",
                           max_retries=0, timeout=600) as client:
        model = args.model or (await client.models.list()).data[0].id
        print(f"# {args.url} model={model} max_tokens={args.max_tokens} "
              f"requests_per_client={args.requests_per_client} greedy, ignore_eos, streamed chat")
        await one_request(client, model, -1, args)  # warm-up, not counted
        levels = []
        header = ("clients", "requests", "wall_s", "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms",
                  "itl_p99_ms")
        print(" ".join(f"{h:>12}" for h in header))
        for clients in args.concurrency:
            level = await run_level(client, model, clients, args)
            levels.append(level)
            print(" ".join(f"{level[h]:>12}" for h in header), flush=True)
    print(json.dumps({"bench": "serve_load", "url": args.url, "model": model, "max_tokens": args.max_tokens,
                      "requests_per_client": args.requests_per_client, "levels": levels}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server (loopback only)")
    parser.add_argument("--api-key")
    parser.add_argument("--model", help="model id (default: the server's first)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-client", type=int, default=2, help="requests each client sends in turn")
    parser.add_argument("--max-tokens", type=int, default=64)
    asyncio.run(main(parser.parse_args()))
