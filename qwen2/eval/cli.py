"""`qwen2 eval ppl` and `qwen2 eval niah`: long-context evaluations (see perplexity.py, niah.py)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from qwen2.errors import OptionError
from qwen2.options import add_model_options, model_options, parse_tokens


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


def add_arguments(subparsers: argparse._SubParsersAction) -> None:
    """Register `eval ppl` and `eval niah` on the `qwen2` command's subparsers."""
    evaluate = subparsers.add_parser("eval", help="long-context evals: strided perplexity, needle in a haystack")
    sub = evaluate.add_subparsers(dest="eval_command", required=True)

    p = sub.add_parser("ppl", help="strided perplexity of a text at several context lengths")
    p.add_argument("file", help="a UTF-8 text file, or 'wiki' for the fetched Wikipedia text")
    # --ctx is the context each window gives, as for every command; here a list of them
    p.add_argument("--ctx", dest="windows", type=token_list, default="2k,4k,8k,16k,32k",
                   help="window lengths (default %(default)s)")
    p.add_argument("--stride", type=parse_tokens, help="window step (default: ctx/2)")
    p.add_argument("--max-tokens", type=parse_tokens, help="use the first N tokens of FILE (default: the largest "
                   "--ctx, so the largest window scores every token with all of its preceding context)")
    p.add_argument("--prefill-chunk", type=parse_tokens, default=512, help="tokens per forward (default 512)")
    add_model_options(p, ctx=False, speculative=False)
    p.set_defaults(func=cmd_ppl)

    p = sub.add_parser("niah", help="needle in a haystack over prompt lengths x needle depths")
    p.add_argument("--lengths", type=token_list, default="2k,4k,8k", help="prompt lengths (default %(default)s)")
    p.add_argument("--depths", type=depth_list, default="0,25,50,75,100", help="needle depths in percent "
                   "(default %(default)s)")
    p.add_argument("--needles", type=int, default=1, help="needles (facts and questions) per cell (default 1)")
    p.add_argument("--out", type=Path, help="results JSON, written after every cell; a rerun skips finished cells")
    p.add_argument("--png", type=Path, help="write an accuracy heatmap (needs matplotlib)")
    p.add_argument("--answer-tokens", type=int, default=32, help="greedy tokens to decode (default 32)")
    p.add_argument("--prefill-chunk", type=parse_tokens, default=512, help="tokens per forward (default 512)")
    add_model_options(p, ctx=False, speculative=False)
    p.set_defaults(func=cmd_niah)


def _load(args: argparse.Namespace, ctx: int):
    from qwen2.loading import load

    llm = load(**model_options(args), ctx=ctx, max_slots=1, prefill_chunk=args.prefill_chunk)
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
        raise OptionError(f"no such file: {args.file} (or give 'wiki' for the Wikipedia text)")
    if args.stride is not None and args.stride > min(args.windows):
        raise OptionError(f"--stride {args.stride} is longer than the window --ctx {min(args.windows)}; a stride "
                          "of at most the window scores every token")
    llm = _load(args, ctx=16)  # perplexity drives the model with its own cache; keep the engine's tiny
    ids = llm.tokenizer.encode(text)[: args.max_tokens or max(args.windows)]
    if max(args.windows) > len(ids):
        raise OptionError(f"--ctx {max(args.windows)} is longer than the {len(ids)} tokens to score; "
                         "give a longer file or a larger --max-tokens")
    print(f"# {args.file}: {len(ids)} tokens\n{'ctx':>7} {'stride':>7} {'scored':>7} {'ppl':>9} {'seconds':>8} "
          f"{'peak MiB':>9}", flush=True)
    rows = []
    for ctx in args.windows:
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
    from qwen2.eval.niah import format_table, run_grid, save_heatmap

    if args.needles < 1 or args.answer_tokens < 1:
        raise OptionError("--needles and --answer-tokens must be at least 1")
    # the loader checks the longest cell against the context limit before any cell runs
    llm = _load(args, ctx=max(args.lengths) + args.answer_tokens)
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
