"""`qwen2 data reject-sample`, `exec-feedback` and `instruct-feedback`: SFT and preference data from
the model's own samples (see synth.py and instruct_feedback.py for what is kept and what is written).

    qwen2 data reject-sample --out DIR (--problems FILE | --source gsm-symbolic [--lang eng,zho] [--variants 1]
        | --source asdiv) [--k 4] [--limit N] [--temperature 0.8] [--max-tokens 384] [--seed 0] [--model M ...]
    qwen2 data exec-feedback --out DIR (--problems FILE | --source humaneval) [--k 4] [--limit N]
        [--temperature 0.8] [--max-tokens 512] [--timeout 10] [--seed 0] [--model M ...]
    qwen2 data instruct-feedback --out DIR [--prompts FILE | --prompt-seed 0] [--k 4] [--limit N] [--temperature 0.8]
        [--max-tokens 512] [--seed 0] [--model M ...]

Each takes --ray ADDRESS|local[:N] to deal its samples to N engine actors on Ray
(qwen2.eval.engine_actors); samples.jsonl is the same either way, so a run resumes the other.

The problems are named, never implied: the user's own (--problems, qwen2.train.problems), or a
built-in source. ASDiv and HumanEval are the sets `qwen2 eval asdiv|humaneval` report, so a
model trained on data from them has those scores contaminated: they need --source, which the
run's settings record (`contaminates`) and a warning repeats. GSM-Symbolic templates (instantiated
with new numbers and names, --seed choosing them) are mgsm's problems: recorded and noted the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qwen2.errors import OptionError
from qwen2.eval.cli import add_ray, add_unsafe_exec, check_ray
from qwen2.options import add_engine_options, add_model_options, engine_options, model_options


def add_arguments(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="automated alignment data: rejection sampling (maths), execution "
                                 "feedback (code, instruction following)")
    sub = data.add_subparsers(dest="data_command", required=True)
    p = sub.add_parser("reject-sample", help="k solutions per maths problem; correct ones become SFT data, correct "
                       "vs wrong preference pairs")
    p.add_argument("--problems", type=Path, help="your problems, JSONL: {\"question\", \"answer\": number or text"
                   "[, \"id\"]} a line")
    p.add_argument("--source", choices=("gsm-symbolic", "asdiv"), help="built-in problems instead: gsm-symbolic "
                   "(GSM8K templates with new numbers: mgsm's problems), asdiv (the asdiv eval's own test set)")
    p.add_argument("--lang", help="gsm-symbolic languages, comma-separated (default: MGSM's eleven)")
    p.add_argument("--variants", type=int, help="gsm-symbolic instances per template, seeds seed.. (default 1)")
    _common(p, max_tokens=384)
    p.set_defaults(func=run)
    p = sub.add_parser("exec-feedback", help="k programs per problem run against its tests in a sandbox; "
                       "passing ones become SFT data, passing vs failing preference pairs")
    p.add_argument("--problems", type=Path, help="your problems, JSONL: {\"prompt\": task, \"tests\": asserts} "
                   "or HumanEval's fields a line")
    p.add_argument("--source", choices=("humaneval",), help="built-in problems instead: humaneval (the humaneval "
                   "eval's own problems)")
    _common(p, max_tokens=512)
    p.add_argument("--timeout", type=float, default=10.0, help="seconds each program may run (default %(default)s)")
    add_unsafe_exec(p)
    p.set_defaults(func=run)
    p = sub.add_parser("instruct-feedback", help="k replies per prompt with checkable instructions (\"at most 50 "
                       "words\"); replies meeting all become SFT data, meeting vs failing preference pairs")
    p.add_argument("--prompts", type=Path, help="JSONL, a line each: {\"prompt\": task, \"constraints\": [{\"kind\": "
                   "id, ...parameters}]} (default: alpaca tasks that qwen2 eval ifeval does not use, with drawn "
                   "constraints)")
    p.add_argument("--prompt-seed", type=int, default=0, help="the built-in set's constraints (default 0)")
    _common(p, max_tokens=512)
    p.set_defaults(func=run_instruct)


def _common(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--out", type=Path, required=True, help="folder for samples.jsonl (resumable), sft.jsonl and "
                   "pairs.jsonl")
    p.add_argument("--k", type=int, default=4, help="samples per problem (default %(default)s)")
    p.add_argument("--limit", type=int, help="only the first N problems (per language for gsm-symbolic; default: "
                   "all)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=max_tokens, help="tokens per sample (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sample s of every problem uses seed + s (default 0)")
    add_ray(p)
    add_engine_options(p, max_concurrency=8, kv_memory_default="a quarter of the available memory",
                       old_flag="--slots")
    add_model_options(p, speculative=False)


def check_options(args: argparse.Namespace) -> None:
    """A data command's options, checked before anything loads; a fault is one OptionError."""
    from qwen2.engine.sampling import SamplingParams
    from qwen2.errors import RequestError

    engine_options(args)  # checks them
    check_ray(args)
    for name in ("k", "limit"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise OptionError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.k > 1 and args.temperature == 0:
        raise OptionError("--temperature 0 gives every sample the same reply; use a temperature above 0 with --k > 1")
    if getattr(args, "timeout", 1) <= 0:
        raise OptionError(f"--timeout must be positive, got {args.timeout}")
    try:
        SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed).validate(0)
    except RequestError as e:
        raise OptionError(str(e)) from None
    if args.out.exists() and not args.out.is_dir():
        raise OptionError(f"--out {args.out} is a file; give a folder")


def _settings(args: argparse.Namespace, **source) -> dict:
    """What a run's samples depend on: samples.jsonl's first line, so a rerun resumes only its own run."""
    return dict(model=str(args.model or "default"), **{k: v for k, v in model_options(args).items() if k != "model"},
                temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed, **source)


@contextmanager
def _engine(args: argparse.Namespace) -> Iterator:
    """The model loaded here, or engine actors on Ray (--ray), ended when the samples are in."""
    from qwen2.loading import load

    if not args.ray:
        yield load(**model_options(args), **engine_options(args))
        return
    from qwen2.eval.engine_actors import EngineActors

    with EngineActors(args.ray, dict(**model_options(args), **engine_options(args))) as actors:
        print(f"# {actors.description}", file=sys.stderr, flush=True)  # stdout is the run's JSON
        yield actors


def _write_data(out: Path, groups: list, group_of: dict[str, str] | None = None) -> tuple[int, int]:
    """sft.jsonl and pairs.jsonl rebuilt from every sample's verdict; their row counts. `group_of`
    gives each pair the held-out group of its prompt."""
    from qwen2.train import synth

    sft, pairs = synth.sft_and_pairs(groups)
    if group_of:
        for pair in pairs:
            pair["group"] = group_of[pair["messages"][-1]["content"]]
    synth.write_jsonl(out / "sft.jsonl", sft)
    synth.write_jsonl(out / "pairs.jsonl", pairs)
    return len(sft), len(pairs)


def _results(args: argparse.Namespace, settings: dict):
    from qwen2.eval.harness import Results

    try:
        return Results(f"data {args.data_command}", settings, args.out / "samples.json")
    except OptionError:
        found = (args.out / "samples.jsonl").read_text(encoding="utf-8").partition("\n")[0]
        raise OptionError(f"{args.out / 'samples.jsonl'} holds samples of another run ({found}), not of {settings}; "
                          "give another --out, or delete that file to start afresh") from None


def run(args: argparse.Namespace) -> None:
    from qwen2.eval import humaneval
    from qwen2.eval.sandbox import Limits
    from qwen2.train import synth

    check_options(args)
    code = args.data_command == "exec-feedback"
    problems, source, skipped = chosen_problems(args)
    verdict = synth.math_verdict if source["source"] == "asdiv" else synth.answer_verdict
    settings = _settings(args, **source, **({"timeout": args.timeout} if code else {}))
    sandbox = humaneval.sandbox_level(args.unsafe_exec) if code else None
    ids = [f"{p['task_id' if code else 'id']}#{s}" for p in problems for s in range(args.k)]
    results = _results(args, settings)
    start = time.perf_counter()
    todo = sum(key not in results for key in ids)
    if todo:
        with _engine(args) as llm:
            if code:
                limits = Limits(wall_seconds=args.timeout, cpu_seconds=int(args.timeout) + 1)
                humaneval.run(llm, problems, results, "chat", args.k, args.temperature, args.max_tokens, args.seed,
                              limits, args.unsafe_exec)
            else:
                synth.reject_sample(llm, problems, results, args.k, args.temperature, args.max_tokens, args.seed,
                                    verdict)
    records = results.ordered(ids)
    groups = synth.code_groups(problems, records) if code else synth.math_groups(problems, records, verdict)
    sft, pairs = _write_data(args.out, groups)
    verdicts = [r["passed"] if code else verdict(r["reply"], r["answer"]) for r in records]
    kept = sum(v is True for v in verdicts)
    print(json.dumps(dict(out=str(args.out), problems=len(problems), samples=len(records), sampled_now=todo,
                          kept=kept, kept_fraction=round(kept / len(records), 4) if records else 0.0,
                          rejected=sum(v is False for v in verdicts), sft=sft, pairs=pairs,
                          seconds=round(time.perf_counter() - start, 1), **({"sandbox": sandbox} if code else {}),
                          **({"templates_skipped": dict(skipped)} if skipped else {}))))


def chosen_problems(args: argparse.Namespace) -> tuple[list[dict], dict, dict]:
    """The problems --problems or --source names, what the settings record of them, and (for
    gsm-symbolic) the templates left out by reason."""
    import hashlib

    from qwen2.eval import asdiv, humaneval, mgsm
    from qwen2.train import gsm_symbolic
    from qwen2.train.problems import code_problems, math_problems

    code = args.data_command == "exec-feedback"
    if (args.problems is None) == (args.source is None):
        raise OptionError("name the problems: --problems FILE (your own) or --source "
                          f"{'humaneval' if code else 'gsm-symbolic|asdiv'}, not both")
    if not code and args.source != "gsm-symbolic" and (args.lang or args.variants):
        raise OptionError("--lang and --variants choose gsm-symbolic problems; add --source gsm-symbolic")
    if args.problems is not None:
        found = code_problems(args.problems) if code else math_problems(args.problems)
        sha256 = hashlib.sha256(args.problems.read_bytes()).hexdigest()
        return found[: args.limit], dict(source=str(args.problems), sha256=sha256), {}
    if args.source == "gsm-symbolic":
        if args.variants is not None and args.variants < 1:
            raise OptionError(f"--variants must be at least 1, got {args.variants}")
        langs, variants = mgsm.language_list(args.lang), args.variants or 1
        found, skipped = gsm_symbolic.problems(langs, args.seed, variants, args.limit)
        print("# note: GSM-Symbolic's templates are the problems qwen2 eval mgsm asks (with new numbers), so a model "
              "trained on this data has seen them", file=sys.stderr)
        return found, dict(source="gsm-symbolic", langs=langs, variants=variants, contaminates="mgsm"), skipped
    print(f"# warning: --source {args.source} samples the {args.source} eval's own problems; a model trained on this "
          f"data has its qwen2 eval {args.source} score contaminated", file=sys.stderr)
    found = humaneval.problems() if code else asdiv.problems()
    return found[: args.limit], dict(source=args.source, contaminates=args.source), {}


def run_instruct(args: argparse.Namespace) -> None:
    from qwen2.train import instruct_feedback

    check_options(args)
    items, source = instruct_feedback.prompts(args.prompts, args.prompt_seed)
    items = items[: args.limit]
    settings = _settings(args, **source)
    ids = [f"{item['id']}#{s}" for item in items for s in range(args.k)]
    results = _results(args, settings)
    start = time.perf_counter()
    todo = sum(key not in results for key in ids)
    if todo:
        with _engine(args) as llm:
            instruct_feedback.sample(llm, items, results, args.k, args.temperature, args.max_tokens, args.seed)
    groups = instruct_feedback.groups(items, results.ordered(ids))
    # one task under other constraints (another --prompt-seed, or a file that repeats it) is one group
    sft, pairs = _write_data(args.out, groups, {item["prompt"]: item["task"] for item in items})
    shares = [share for _, samples in groups for _, share in samples]
    kept = sum(share == 1 for share in shares)
    print(json.dumps(dict(out=str(args.out), prompts=len(items), samples=len(shares), sampled_now=todo, kept=kept,
                          kept_fraction=round(kept / len(shares), 4) if shares else 0.0,
                          rejected=len(shares) - kept, sft=sft, pairs=pairs,
                          seconds=round(time.perf_counter() - start, 1), source=source["source"])))
