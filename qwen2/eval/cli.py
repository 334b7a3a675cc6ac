"""`qwen2 eval ppl` and `qwen2 eval niah`: long-context evaluations (see perplexity.py, niah.py)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from qwen2.errors import Qwen2Error


def parse_tokens(text: str) -> int:
    """A token count: "2k" is 2048, "32K" 32768, "1500" 1500."""
    text = text.strip().lower()
    try:
        value = int(text[:-1]) * 1024 if text.endswith("k") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r} (e.g. 4096 or 4k)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"token counts must be positive, got {text!r}")
    return value


def token_list(text: str) -> list[int]:
    return [parse_tokens(t) for t in text.split(",")]


def depth_list(text: str) -> list[float]:
    try:
        depths = [float(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"depths are percentages, e.g. 0,50,100; got {text!r}") from None
    if not all(0 <= d <= 100 for d in depths):
        raise argparse.ArgumentTypeError(f"depths must be within 0..100, got {text!r}")
    return depths


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", help="a .gguf file, an HF checkpoint folder, or a hub id "
                   "(default: the embedded Qwen2.5-Coder-0.5B-Instruct)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    p.add_argument("--device", help="cpu or cuda (default: cuda if present)")
    p.add_argument("--rope-scaling", help="e.g. yarn:4 (static YaRN, x4 the trained context)")
    p.add_argument("--dca", help="dual chunk attention CHUNK[:LOCAL], e.g. 32768:4096")
    p.add_argument("--prefill-chunk", type=parse_tokens, default=512, help="tokens per forward (default 512)")


def add_arguments(subparsers: argparse._SubParsersAction) -> None:
    """Register `eval ppl` and `eval niah` on the `qwen2` command's subparsers."""
    evaluate = subparsers.add_parser("eval", help="long-context evals: strided perplexity, needle in a haystack")
    sub = evaluate.add_subparsers(dest="eval_command", required=True)

    p = sub.add_parser("ppl", help="strided perplexity of a text at several context lengths")
    p.add_argument("file", help="a UTF-8 text file, or 'wiki' for the fetched Wikipedia text")
    p.add_argument("--ctx", type=token_list, default="2k,4k,8k,16k,32k", help="window lengths (default %(default)s)")
    p.add_argument("--stride", type=parse_tokens, help="window step (default: ctx/2)")
    p.add_argument("--max-tokens", type=parse_tokens, help="use the first N tokens of FILE (default: the largest "
                   "--ctx, so the largest window scores every token with all of its preceding context)")
    _model_options(p)
    p.set_defaults(func=cmd_ppl)

    p = sub.add_parser("niah", help="needle in a haystack over prompt lengths x needle depths")
    p.add_argument("--lengths", type=token_list, default="2k,4k,8k", help="prompt lengths (default %(default)s)")
    p.add_argument("--depths", type=depth_list, default="0,25,50,75,100", help="needle depths in percent "
                   "(default %(default)s)")
    p.add_argument("--needles", type=int, default=1, help="needles (facts and questions) per cell (default 1)")
    p.add_argument("--out", type=Path, help="results JSON, written after every cell; a rerun skips finished cells")
    p.add_argument("--png", type=Path, help="write an accuracy heatmap (needs matplotlib)")
    p.add_argument("--answer-tokens", type=int, default=32, help="greedy tokens to decode (default 32)")
    _model_options(p)
    p.set_defaults(func=cmd_niah)


def _load(args: argparse.Namespace, max_seq_len: int):
    from qwen2.engine.llm import load

    llm = load(args.model, dtype=args.dtype, device=args.device, max_slots=1, max_seq_len=max_seq_len,
               prefill_chunk=args.prefill_chunk, rope_scaling=args.rope_scaling, dca=args.dca)
    weight = llm.model.model.embed_tokens.weight
    print(f"# model {args.model or 'default'} ({weight.dtype}, {weight.device}), rope scaling "
          f"{llm.config.rope_scaling}, dca {llm.config.dual_chunk_attention_config}, loaded in "
          f"{llm.load_seconds:.1f}s", flush=True)
    return llm


def cmd_ppl(args: argparse.Namespace) -> None:
    from qwen2.eval.data import haystack_text
    from qwen2.eval.memory import peak_rss_mib, reset_peak_rss
    from qwen2.eval.perplexity import perplexity, windows

    if args.file == "wiki":
        text = haystack_text()
    elif Path(args.file).is_file():
        text = Path(args.file).read_text(encoding="utf-8")
    else:
        raise Qwen2Error(f"no such file: {args.file} (or give 'wiki' for the Wikipedia text)")
    llm = _load(args, max_seq_len=16)  # perplexity drives the model with its own cache; keep the engine's tiny
    ids = llm.tokenizer.encode(text)[: args.max_tokens or max(args.ctx)]
    if max(args.ctx) > len(ids):
        raise Qwen2Error(f"--ctx {max(args.ctx)} is longer than the {len(ids)} tokens to score; "
                         "give a longer file or a larger --max-tokens")
    print(f"# {args.file}: {len(ids)} tokens\n{'ctx':>7} {'stride':>7} {'scored':>7} {'ppl':>9} {'seconds':>8} "
          f"{'peak MiB':>9}", flush=True)
    rows = []
    for ctx in args.ctx:
        stride = args.stride or ctx // 2
        scored = sum(end - first for _, end, first in windows(len(ids), ctx, stride))
        reset_peak_rss()
        start = time.perf_counter()
        ppl = perplexity(llm, ids, ctx, stride, chunk=args.prefill_chunk)
        rows.append(dict(ctx=ctx, stride=stride, scored=scored, ppl=round(ppl, 4),
                         seconds=round(time.perf_counter() - start, 1), peak_rss_mib=round(peak_rss_mib())))
        print("".join(f"{v:>{w}}" for v, w in zip(rows[-1].values(), (7, 8, 8, 10, 9, 10))), flush=True)
    print(json.dumps(dict(eval="ppl", file=args.file, tokens=len(ids), rope_scaling=args.rope_scaling,
                          dca=args.dca, results=rows)))


def cmd_niah(args: argparse.Namespace) -> None:
    from qwen2.engine.engine import context_limit
    from qwen2.eval.niah import format_table, run_grid, save_heatmap

    if args.needles < 1 or args.answer_tokens < 1:
        raise Qwen2Error("--needles and --answer-tokens must be at least 1")
    llm = _load(args, max_seq_len=max(args.lengths) + args.answer_tokens)
    limit = context_limit(llm.config)
    if max(args.lengths) > limit:  # fail before the shorter cells run; the engine would refuse the long prompt later
        raise Qwen2Error(f"--lengths up to {max(args.lengths)} exceed the model's context limit {limit} with its "
                         "rope scaling; extend it with --rope-scaling yarn:F or --dca CHUNK")
    settings = dict(model=str(args.model or "default"),
                    dtype=str(llm.model.model.embed_tokens.weight.dtype).removeprefix("torch."),
                    rope_scaling=args.rope_scaling, dca=args.dca, answer_tokens=args.answer_tokens)
    start = time.perf_counter()
    cells = run_grid(llm, args.lengths, args.depths, args.needles, args.out, settings, max_tokens=args.answer_tokens)
    print(format_table(cells))
    if args.png:
        save_heatmap(cells, args.png, title=f"NIAH: {settings['model']}, {settings['dtype']}, "
                     f"rope {args.rope_scaling or 'native'}, dca {args.dca or 'off'}")
        print(f"# heatmap written to {args.png}")
    correct = sum(c["correct"] for c in cells)
    print(json.dumps(dict(eval="niah", settings=settings, cells=len(cells), correct=correct,
                          accuracy=round(correct / len(cells), 4), seconds=round(time.perf_counter() - start, 1))))
