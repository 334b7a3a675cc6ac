"""Load test of OpenAI-compatible servers: throughput, time to first token, inter-token latency,
lost requests; ours beside llama.cpp's (llama-cpp-python[server]) on the same GGUF.

    python bench/serve_load.py --url http://127.0.0.1:8000                  # a server already running
    python bench/serve_load.py --launch ours llama --llama-python VENV/bin/python \\
        --requests 1000 --concurrency 1 8 32                                 # start each, one at a time

The highest level sends `--requests` streamed chat requests (default 1000), each lower one
max(2 x clients, requests / 8), from that many concurrent clients, each asking for a seeded random 16..64 tokens
(or `--reply-tokens`) with both end tokens banned by logit_bias, so every reply has exactly its tokens on every
server. Prompts differ at their start, so no prefix cache skips them, unless `--system-tokens N` puts one shared
system prompt of about N tokens before them all: then the table also shows the prompt tokens the server reports
as cached (usage.prompt_tokens_details). A request is lost when it fails or returns fewer tokens than asked.
Streams are read as server-sent events (`--client openai`: through the official client, whose CPU the server
shares on a small machine). Servers run one after the other, never together, and only on loopback. Prints a table
per server, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlparse

import httpx
from openai import AsyncOpenAI

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
END_TOKENS = {"151643": -100, "151645": -100}  # <|endoftext|>, <|im_end|>: replies run to max_tokens
HEADER = ("clients", "requests", "lost", "wall_s", "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms",
          "itl_p99_ms", "prompt_tokens", "cached_tokens")


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


def system_prompt(tokens: int) -> str:
    """About `tokens` tokens of plain English (about 1.3 tokens a word), the same for every request."""
    words = ("You are a careful assistant for a lighthouse museum; answer briefly and kindly, cite the log "
             "books when you can, and never invent dates or names of keepers.").split()
    return " ".join(words[i % len(words)] for i in range(int(tokens / 1.3)))


Chunk = tuple[bool, str | None, tuple[int, int, int] | None]  # any text, finish reason, usage (out, prompt, cached)


async def openai_chunks(client: AsyncOpenAI, body: dict) -> AsyncIterator[Chunk]:
    """The stream through the official client, each chunk a pydantic object as applications see them."""
    async for chunk in await client.chat.completions.create(**body):
        choice = chunk.choices[0] if chunk.choices else None
        usage = chunk.usage
        details = usage.prompt_tokens_details if usage else None
        yield (bool(choice and choice.delta.content), choice.finish_reason if choice else None,
               (usage.completion_tokens, usage.prompt_tokens, (details.cached_tokens or 0) if details else 0)
               if usage else None)


async def sse_chunks(http: httpx.AsyncClient, body: dict) -> AsyncIterator[Chunk]:
    """The same stream read as server-sent events and json.loads, as vLLM's benchmark_serving reads it: half the
    official client's CPU per chunk (0.17 vs 0.33 ms on a 2-core Xeon), which on a small machine the server
    under test would lose."""
    async with http.stream("POST", "chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            chunk = json.loads(line[5:])
            choice = chunk["choices"][0] if chunk.get("choices") else None
            usage = chunk.get("usage")
            details = (usage or {}).get("prompt_tokens_details") or {}
            yield (bool(choice and choice["delta"].get("content")), choice.get("finish_reason") if choice else None,
                   (usage["completion_tokens"], usage["prompt_tokens"], details.get("cached_tokens") or 0)
                   if usage else None)


async def one_request(client: AsyncOpenAI | httpx.AsyncClient, model: str, index: int, max_tokens: int,
                      system: str = "") -> dict:
    start = time.perf_counter()
    stamps: list[float] = []
    tokens, finish, prompt_tokens, cached = 0, None, 0, 0
    messages = [{"role": "system", "content": system}] if system else []
    body = {"model": model, "messages": [*messages, {"role": "user", "content": f"[{index}] {PROMPT}"}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True, "logit_bias": END_TOKENS,
            "stream_options": {"include_usage": True}}
    chunks = openai_chunks(client, body) if isinstance(client, AsyncOpenAI) else sse_chunks(client, body)
    try:
        async for text, chunk_finish, usage in chunks:
            if text:
                stamps.append(time.perf_counter())
            finish = chunk_finish or finish
            if usage:
                tokens, prompt_tokens, cached = usage
    except Exception as e:  # counted as lost, the run goes on
        return {"lost": f"{type(e).__name__}: {e}"[:200], "ttft": None, "gaps": [], "tokens": 0, "prompt_tokens": 0,
                "cached": 0}
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    lost = None if finish == "length" else f"finish_reason {finish!r} after {len(stamps)} chunks"
    # a streamed chunk may carry more than one token (text held back): usage counts tokens
    return {"lost": lost, "ttft": stamps[0] - start if stamps else None, "gaps": gaps, "tokens": tokens or len(stamps),
            "prompt_tokens": prompt_tokens, "cached": cached}


async def run_level(client: AsyncOpenAI | httpx.AsyncClient, model: str, clients: int, requests: int, seed: int,
                    args: argparse.Namespace) -> dict:
    rng = random.Random(seed)
    lengths = [args.reply_tokens or rng.randint(16, 64) for _ in range(requests)]
    indices = iter(range(requests))  # shared: each client takes the next one
    system = system_prompt(args.system_tokens) if args.system_tokens else ""

    async def worker() -> list[dict]:
        return [await one_request(client, model, seed * 100_000 + i, lengths[i], system) for i in indices]

    start = time.perf_counter()
    results = [r for batch in await asyncio.gather(*(worker() for _ in range(clients))) for r in batch]
    wall = time.perf_counter() - start
    ttft = [r["ttft"] * 1000 for r in results if r["ttft"] is not None]
    itl = [g * 1000 for r in results for g in r["gaps"]]
    lost = [r["lost"] for r in results if r["lost"]]
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "lost": len(lost), "lost_examples": lost[:3],
            "wall_s": round(wall, 1), "output_tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
            "ttft_p50_ms": round(percentile(ttft, 50)), "ttft_p99_ms": round(percentile(ttft, 99)),
            "itl_p50_ms": round(percentile(itl, 50), 1), "itl_p99_ms": round(percentile(itl, 99), 1),
            "prompt_tokens": sum(r["prompt_tokens"] for r in results),
            "cached_tokens": sum(r["cached"] for r in results)}


async def load(url: str, args: argparse.Namespace, name: str) -> dict:
    loopback_only(url)
    base = url.rstrip("/") + "/v1/"
    async with (AsyncOpenAI(base_url=base, api_key=args.api_key or "none", max_retries=0, timeout=3600) as official,
                httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {args.api_key or 'none'}"},
                                  timeout=3600, limits=httpx.Limits(max_connections=None)) as http):
        model = args.model or (await official.models.list()).data[0].id
        client = official if args.client == "openai" else http
        await one_request(client, model, -1, 16)  # warm-up, not counted
        print(f"# {name}: {url} model={model}, {args.client} client, {os.getloadavg()[0]:.1f} load average at the "
              "start", flush=True)
        print(" ".join(f"{h:>12}" for h in HEADER), flush=True)
        levels = []
        for clients in args.concurrency:
            requests = args.requests if clients == max(args.concurrency) else max(clients * 2, args.requests // 8)
            level = await run_level(client, model, clients, requests, seed=clients, args=args)
            level["load_average"] = round(os.getloadavg()[0], 1)
            levels.append(level)
            print(" ".join(f"{level[h]:>12}" for h in HEADER), f"  (load {level['load_average']})", flush=True)
    return {"server": name, "url": url, "model": model, "levels": levels}


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode} before it answered")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"{url} did not answer in {timeout} s")


def launch(name: str, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    """Start one server on a free loopback port: ours with its defaults (and `--ctx` if given), or
    llama.cpp's (llama-cpp-python[server], which decodes one request at a time)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gguf = args.gguf or str(default_gguf())
    if name == "ours":
        cmd = [sys.executable, "-m", "qwen2.server", "--model", gguf, "--port", str(port), "--max-queue", "1024",
               *(["--ctx", str(args.ctx)] if args.ctx else [])]
    else:
        cmd = [args.llama_python, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1", "--port",
               str(port), "--n_ctx", str(args.ctx or 8192), "--n_threads", str(args.llama_threads),
               "--interrupt_requests", "False"]  # queue concurrent requests instead of cutting the running one
    log = open(Path(args.logs) / f"serve_load_{name}.log", "w")  # noqa: SIM115 (open while the server runs)
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, process)
    return process, url


def default_gguf() -> Path:
    from qwen2.weights.default import default_model_path

    return default_model_path()


async def main(args: argparse.Namespace) -> None:
    reports = []
    if args.url:
        reports.append(await load(args.url, args, "given"))
    for name in args.launch:
        process, url = launch(name, args)
        try:
            reports.append(await load(url, args, name))
        finally:
            process.terminate()
            process.wait(timeout=30)
    print(json.dumps({"bench": "serve_load", "cpu": os.cpu_count(), "client": args.client, "requests": args.requests,
                      "reports": reports}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a server already running (loopback only)")
    parser.add_argument("--launch", nargs="*", default=[], choices=["ours", "llama"],
                        help="start these servers here, one after the other, and load each")
    parser.add_argument("--llama-python", default="python", help="a Python with llama-cpp-python[server]")
    parser.add_argument("--llama-threads", type=int, default=os.cpu_count(), help="llama.cpp's --n_threads")
    parser.add_argument("--gguf", help="the model both servers load (default: the embedded default model)")
    parser.add_argument("--ctx", type=int, help="context per sequence for launched servers (default: ours its "
                        "default, llama.cpp 8192)")
    parser.add_argument("--logs", default=".", help="folder for the launched servers' logs")
    parser.add_argument("--api-key")
    parser.add_argument("--model", help="model id (default: the server's first)")
    parser.add_argument("--client", choices=["sse", "openai"], default="sse",
                        help="read the streams as server-sent events (default) or through the official openai client "
                        "(pydantic objects: twice the CPU a chunk, taken from the server on a small machine)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=1000, help="requests at the highest concurrency")
    parser.add_argument("--reply-tokens", type=int, help="tokens per reply (default: seeded random 16..64)")
    parser.add_argument("--system-tokens", type=int, default=0, help="a shared system prompt of about this many "
                        "tokens before every request (default: none)")
    asyncio.run(main(parser.parse_args()))
