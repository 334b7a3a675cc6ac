"""Long-context numbers on the default model: needle-in-a-haystack accuracy and strided perplexity
of Wikipedia against context length, with seconds and peak RSS for each length.

    python bench/long_context.py [--lengths 2k,4k,8k] [--depths 0,50,100] [--needles 1]
        [--ppl-ctx 2k,4k,8k] [--ppl-tokens 8k] [--rope-scaling yarn:4] [--dca 32768:4096]
        [--model PATH] [--dtype auto] [--threads N] [--no-niah] [--no-ppl] [--out DIR]

The NIAH grid is resumable (OUT/niah.json, OUT defaults to $TMPDIR/qwen2_long_context;
delete it for fresh timings) and drawn to OUT/niah.png. NIAH seconds include the engine's
prefix-cache reuse between cells of one length; "cold tok/s" is the cell with the least
reuse (prefill plus up to 32 decoded tokens). Prints one JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from qwen2 import load
from qwen2.eval.cli import depth_list, token_list
from qwen2.eval.data import haystack_text
from qwen2.eval.niah import format_table, run_grid, save_heatmap, tokens_label
from qwen2.eval.perplexity import perplexity
from qwen2.memory import peak_rss_mib, reset_peak_rss
from qwen2.options import parse_tokens


def niah_rows(cells: list[dict]) -> list[dict]:
    rows = []
    for length in sorted({c["length"] for c in cells}):
        group = [c for c in cells if c["length"] == length]
        cold = min(group, key=lambda c: c["cached_tokens"])
        correct = sum(c["correct"] for c in group)
        rows.append(dict(length=length, cells=len(group), accuracy=round(correct / len(group), 3),
                         seconds=round(sum(c["seconds"] for c in group), 1),
                         cold_tok_s=round((cold["prompt_tokens"] - cold["cached_tokens"]) / cold["seconds"], 1),
                         peak_rss_mib=max(c["peak_rss_mib"] for c in group)))
    return rows


def niah(llm, args: argparse.Namespace, settings: dict) -> list[dict]:
    print(f"\nNIAH: lengths {args.lengths}, depths {args.depths}, {args.needles} needle(s)", flush=True)
    cells = run_grid(llm, args.lengths, args.depths, args.needles, args.out / "niah.json", settings)
    cells = [c for c in cells if c["length"] in args.lengths and c["depth"] in args.depths
             and c["needle"] < args.needles]
    print(format_table(cells))
    save_heatmap(cells, args.out / "niah.png", title=f"NIAH, {settings['model']}, {settings['dtype']}, "
                 f"rope {args.rope_scaling or 'native'}, dca {args.dca or 'off'}")
    rows = niah_rows(cells)
    print(f"{'length':>7} {'cells':>5} {'acc':>5} {'seconds':>8} {'cold tok/s':>10} {'peak MiB':>9}")
    for r in rows:
        print(f"{tokens_label(r['length']):>7} {r['cells']:>5} {r['accuracy']:>5} {r['seconds']:>8} "
              f"{r['cold_tok_s']:>10} {r['peak_rss_mib']:>9}")
    print(f"heatmap: {args.out / 'niah.png'}", flush=True)
    return rows


def ppl(llm, ids: list[int], contexts: list[int]) -> list[dict]:
    print(f"\nperplexity of the first {len(ids)} Wikipedia tokens, stride ctx/2", flush=True)
    print(f"{'ctx':>7} {'ppl':>8} {'seconds':>8} {'peak MiB':>9}")
    rows = []
    for ctx in contexts:
        reset_peak_rss()
        t = time.perf_counter()
        value = perplexity(llm, ids, ctx)
        rows.append(dict(ctx=ctx, ppl=round(value, 3), seconds=round(time.perf_counter() - t, 1),
                         peak_rss_mib=round(peak_rss_mib())))
        print(f"{tokens_label(ctx):>7} {value:8.3f} {rows[-1]['seconds']:>8} {rows[-1]['peak_rss_mib']:>9}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=token_list, default="2k,4k,8k")
    ap.add_argument("--depths", type=depth_list, default="0,50,100")
    ap.add_argument("--needles", type=int, default=1)
    ap.add_argument("--ppl-ctx", type=token_list, default="2k,4k,8k")
    ap.add_argument("--ppl-tokens", type=parse_tokens, help="Wikipedia tokens to score (default: the largest ctx)")
    ap.add_argument("--rope-scaling")
    ap.add_argument("--dca")
    ap.add_argument("--model")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--no-niah", action="store_true")
    ap.add_argument("--no-ppl", action="store_true")
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "qwen2_long_context")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    # the engine's cache serves NIAH (prompt + answer); perplexity allocates its own
    llm = load(args.model, dtype=args.dtype, max_concurrency=1, ctx=max(args.lengths) + 32,
               rope_scaling=args.rope_scaling, dca=args.dca)
    dtype = str(llm.model.model.embed_tokens.weight.dtype).removeprefix("torch.")
    print(f"model {args.model or 'default (Qwen2.5-Coder-0.5B-Instruct Q4_K_M)'}; {dtype}; "
          f"{torch.get_num_threads()} threads; rope scaling {args.rope_scaling}; dca {args.dca}; "
          f"loaded in {llm.load_seconds:.1f}s; {llm.engine.kv_budget()}", flush=True)

    settings = dict(model=args.model or "default", dtype=dtype, rope_scaling=args.rope_scaling, dca=args.dca,
                    answer_tokens=32)
    rows, ppl_rows, ids = [], [], []
    if not args.no_niah:
        rows = niah(llm, args, settings)
    if not args.no_ppl:
        ids = llm.tokenizer.encode(haystack_text())[: args.ppl_tokens or max(args.ppl_ctx)]
        ppl_rows = ppl(llm, ids, args.ppl_ctx)

    total = time.perf_counter() - start
    print(f"\ntotal {total:.0f}s")
    print(json.dumps(dict(bench="long_context", dtype=dtype, threads=torch.get_num_threads(),
                          rope_scaling=args.rope_scaling, dca=args.dca, niah=rows, ppl=ppl_rows,
                          ppl_tokens=len(ids), seconds=round(total))))


if __name__ == "__main__":
    main()
