"""`qwen2 bench`: our engine side by side with llama.cpp and transformers, one machine, one run.

    qwen2 bench [--model GGUF] [--peers qwen2,llama.cpp,transformers] [--threads N] [--json PATH] [--quick]
    python -m qwen2.bench ...

Every engine gets the same GGUF, the same token ids (tokenised once, by our tokenizer) and the same
thread count, and runs in its own subprocess, so its peak RSS is its own. Per engine: warm load
time (quantized modes: after a first start has written their on-disk cache), prefill tokens/s
(512 tokens of Wikipedia prose, time to first token, median of 3), batch-1 greedy decode tokens/s
(128 tokens after the first, median of 3), and aggregate tokens/s with 4 and
16 concurrent requests. The parent measures memory read bandwidth and turns each engine's bytes
read per decoded token into a decode roofline.

Rows: ours for `quant="auto"` and each explicit mode (bar the one auto resolved to); llama.cpp with
flash attention off and on; transformers in float32 and bfloat16. Each JSON result is the row the
peer is judged by (ours: auto; a peer: its faster decode), the other rows under its "variants".
`qwen2 bench --peers qwen2` times our engine alone.

Numbers only compare on a quiet machine: each row records how many cores other processes used
meanwhile ("other"), and torch's thread pool slows down many times over when it shares cores.
Peers: `pip install 'qwen2[bench]'`; on CPUs with AMX, build llama-cpp-python with AMX off (its AMX
matmul crashes; CMAKE_ARGS="-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF").

Not covered: GPUs (the peers' CPU paths only), sampling other than greedy, long contexts, prefix
caching, speculative decoding, torch.compile. A peer that is not installed or fails is reported as
missing with the reason, never estimated.

Modules: workloads (the token ids), peers (the runners and their shared timing protocol), rows
(a subprocess per row), machine (CPU, bandwidth, other processes' load), report (rooflines, the
table). This one parses the options and runs the rows; it imports no torch until `run`, since
`qwen2 --help` imports it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qwen2.bench.machine import cpu_model, memory_bandwidth_gbs, package_version
from qwen2.bench.peers import PEERS, VARIANTS, variant_name
from qwen2.bench.report import METRICS, pick, print_report, roofline
from qwen2.bench.rows import prime_quantized_cache, run_row
from qwen2.bench.workloads import build_workload
from qwen2.errors import OptionError
from qwen2.options import model_options

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # --model as every command reads it (qwen2.weights.locate), narrowed to what all engines read.
    # The other model options stay out: the rows set quant and dtype themselves, and all run on CPU.
    parser.add_argument("--model", "-m", help="a .gguf file or a packaged model "
                        "(qwen2.5-coder-0.5b-instruct, qwen2.5-coder-1.5b-instruct): every engine reads the same "
                        "GGUF (default: the embedded Qwen2.5-Coder-0.5B-Instruct)")
    parser.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated subset of {','.join(PEERS)}")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="threads for every engine (default: the cores this process may use)")
    parser.add_argument("--json", metavar="PATH", help="also write {machine, results} to PATH")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 64-token prompt, 16 new tokens, "
                        "c4 only, one load and one run, first variant only")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds each engine run may take")


def requested_peers(text: str) -> list[str]:
    peers = [p.strip() for p in text.split(",") if p.strip()]
    if unknown := set(peers) - set(PEERS):
        raise OptionError(f"unknown peer(s) {', '.join(sorted(unknown))}; choose from {', '.join(PEERS)}")
    return peers


def gguf_path(spec: str | None) -> Path:
    """The GGUF every engine reads: a .gguf file, a packaged model's name, or the default."""
    from qwen2.weights import locate, resolve_model

    # a hub id resolves to safetensors, so it is refused before anything is downloaded
    path = None if locate(spec).kind == "hub" else resolve_model(spec)
    if path is None or path.suffix != ".gguf" or not path.is_file():
        raise OptionError(f"{spec} is not a GGUF file: the bench compares engines on one GGUF file, so pass a "
                          ".gguf file or a packaged model name")
    return path


def run_rows(peers: list[str], base: dict[str, Any], args: argparse.Namespace,
             bandwidth: Callable[[], float]) -> tuple[dict[str, dict[str, dict]], list[float]]:
    """Each peer's variants, one subprocess each: {peer: {row name: result}}, and the bandwidth samples."""
    rows: dict[str, dict[str, dict]] = {}
    # Sampled before every row: a busy neighbour lowers a sample, and the ceiling is the best one.
    samples = [bandwidth()]
    for peer in peers:
        rows[peer] = {}
        for variant in VARIANTS[peer][:1] if args.quick else VARIANTS[peer]:
            name = variant_name(peer, variant)
            auto = rows[peer].get(variant_name(peer, {"quant": "auto"}), {})
            if "quant" in variant and variant["quant"] == auto.get("quant"):
                continue  # the explicit mode auto resolved to: the auto row already shows it
            print(f"running {name} ...", file=sys.stderr, flush=True)
            if peer == "qwen2" and variant["quant"] != "none":
                prime_quantized_cache(Path(base["model"]), variant["quant"])
            samples.append(bandwidth())
            start = time.perf_counter()
            rows[peer][name] = run_row(base | {"peer": peer, "variant": variant}, args.threads, args.timeout)
            print(f"  {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return rows, samples


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every requested engine and print the report; returns {machine, results}."""
    peers = requested_peers(args.peers)
    model = gguf_path(model_options(args).get("model"))
    import torch

    from qwen2.device import cpu_has_native_bf16

    prompt_tokens, new_tokens, concurrency, runs = (64, 16, [4], 1) if args.quick else (512, 128, [4, 16], 3)
    conc_new_tokens = 16 if args.quick else 64
    workload = build_workload(model, prompt_tokens, concurrency)
    with model.open("rb") as f:  # into the page cache, so every engine's load is a warm one
        while f.read(1 << 24):
            pass
    gib, repeats = (0.5, 3) if args.quick else (1.0, 5)
    short_lens = sorted(map(len, workload["short_prompts"]))
    machine = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads, "platform": platform.platform(),
        "torch": torch.__version__, "llama_cpp_python": package_version("llama_cpp_python"),
        "transformers": package_version("transformers"), "native_bf16": cpu_has_native_bf16(),
        "bandwidth_gbs": None,  # the best of the samples, filled in below
        "bandwidth_method": f"torch sum of {gib} GiB float32, {args.threads} threads, best of {repeats}, "
                            "before every engine; the best sample counts",
        "model": str(model), "prompt_tokens": len(workload["prompt"]), "prompt_source": workload["prompt_source"],
        "new_tokens": new_tokens, "runs": runs, "concurrency": concurrency, "concurrent_new_tokens": conc_new_tokens,
        "short_prompt_tokens": f"{short_lens[0]}-{short_lens[-1]}" if short_lens else None,
        "roofline_context": len(workload["prompt"]) + new_tokens / 2,  # the mean KV length while decoding
    }
    base = {"model": str(model), "threads": args.threads, "runs": runs, "loads": 1 if args.quick else 2,
            "concurrency": concurrency, "new_tokens": new_tokens, "concurrent_new_tokens": conc_new_tokens, **workload}
    # `kill` of this process ends the running child too: SystemExit unwinds subprocess.run, which kills it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    rows, samples = run_rows(peers, base, args, lambda: memory_bandwidth_gbs(args.threads, gib, repeats))
    machine["bandwidth_gbs"] = round(max(samples), 2)
    machine["bandwidth_samples_gbs"] = [round(x, 1) for x in samples]
    for r in (r for variants in rows.values() for r in variants.values()):
        if "system_info" in r:  # llama.cpp's compiled-in CPU features
            machine["llama_cpp_build"] = "AMX on" if "AMX" in r["system_info"] else "AMX off"
            machine["llama_cpp_system_info"] = r["system_info"]
        if "missing" not in r:
            r["roofline"] = roofline(r, machine["bandwidth_gbs"], machine["roofline_context"])
    not_run = dict.fromkeys(METRICS) | {"missing": "not requested (--peers)"}
    results = {peer: pick(peer, rows[peer]) if peer in rows else not_run for peer in PEERS}
    print_report(machine, rows, results)
    report = {"machine": machine, "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return report
