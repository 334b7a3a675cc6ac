"""`qwen2 docqa PATH "question" ["question" ...]`: answer questions over a document or a folder of them,
with evidence. Several questions share one loaded model and one reading cache: at level 2 and 3 a
passage read for one question is not computed again for the next (the engine's prefix cache,
given up to DOCQA_KV_SHARE of the available memory, holds the passages' keys and values)."""

from __future__ import annotations

import argparse
import json
import sys

from qwen2.errors import OptionError
from qwen2.options import add_engine_options, add_model_options, engine_options, model_options, parse_tokens

DOCQA_KV_SHARE = 0.6  # of the memory available at start, taken only as passages fill it: ~12 KiB a token for 0.5B


def add_arguments(subparsers: argparse._SubParsersAction) -> None:
    from qwen2.agent import DEFAULT_BUDGET, DEFAULT_MAX_CALLS, DEFAULT_RETRIES

    p = subparsers.add_parser("docqa", help="answer a question over long documents (text, Markdown, HTML, PDF, a "
                              "folder), up to ~1M tokens")
    p.add_argument("path", help="a document or a folder of documents")
    p.add_argument("questions", nargs="+", metavar="question", help="one or more questions, answered in turn")
    p.add_argument("--level", type=parse_levels, default=[2], help="1 retrieval (fast), 2 read every chunk "
                   "(default), 3 multi-hop: the model asks the level-2 reader step by step; or one per question, "
                   "comma-separated (1,2,3)")
    p.add_argument("--budget", type=parse_tokens, default=DEFAULT_BUDGET, help="tokens of document text in the "
                   "answering prompt (default %(default)s; needs --ctx of budget + ~600)")
    p.add_argument("--retries", type=int, default=DEFAULT_RETRIES, help="rounds of re-reading when no chunk helps "
                   "(default %(default)s)")
    p.add_argument("--max-calls", type=int, default=DEFAULT_MAX_CALLS, help="level 3: reader calls at most "
                   "(default %(default)s)")
    add_engine_options(p, max_concurrency=4, kv_memory_default=f"{DOCQA_KV_SHARE * 100:.0f}%% of the available "
                       "memory, taken as used: it keeps read passages for the next question", old_flag="--parallel")
    p.add_argument("--json", action="store_true", help="print one JSON object per question: the question, answer, "
                   "evidence, timings")
    add_model_options(p, speculative=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from qwen2.agent.documents import read_sources

    if args.retries < 0 or args.max_calls < 1:
        raise OptionError("--max-calls must be at least 1, --retries at least 0")
    engine = engine_options(args)
    levels = args.level * len(args.questions) if len(args.level) == 1 else args.level
    if len(levels) != len(args.questions):
        raise OptionError(f"--level lists {len(args.level)} levels for {len(args.questions)} questions; give one "
                          "level for all or one per question")
    sources = read_sources(args.path)  # a bad document fails before torch and the model load

    from qwen2.agent.docqa import DocQA
    from qwen2.loading import load

    llm = load(**model_options(args), **engine, kv_share=None if args.kv_memory else DOCQA_KV_SHARE)
    qa = DocQA(llm, budget=args.budget, retries=args.retries, max_calls=args.max_calls,
               progress=not args.json and sys.stderr.isatty())
    document = qa.document(sources)
    print(f"# {len(document.sources)} document(s), {document.tokens:,} tokens", file=sys.stderr)
    for question, level in zip(args.questions, levels):
        answer = qa.ask(document, question, level=level)
        if args.json:
            print(json.dumps({"question": question, **answer.to_dict()}, ensure_ascii=False), flush=True)
            continue
        if len(args.questions) > 1:
            print(f"Q: {question}")
        print(answer.answer)
        for step in answer.steps:
            print(f"  step: {step['question']} -> {step['answer']}")
        for e in answer.evidence:
            print(f"  [{e.source}, chunk {e.chunk + 1}] {' '.join(e.quote.split())[:300]}")
        print(f"# level {answer.level}, {answer.seconds:.1f}s" + (f", {answer.chunks_read} chunks read"
                                                                   if answer.chunks_read else ""), file=sys.stderr)


def parse_levels(text: str) -> list[int]:
    levels = [x.strip() for x in text.split(",")]
    if not all(x in ("1", "2", "3") for x in levels):
        raise argparse.ArgumentTypeError(f"levels are 1, 2 or 3 (or a comma-separated list of them), got {text!r}")
    return [int(x) for x in levels]
