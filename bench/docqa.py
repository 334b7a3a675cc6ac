"""The document agent on real prose: needles and seeded multi-hop chains, per length and level.

    python bench/docqa.py --lengths 32k,128k,1m --out bench/docqa_grid.jsonl
    python bench/docqa.py --plot bench/docqa_grid.jsonl   # the heatmap, bench/docqa_grid.png
    python bench/docqa.py --table bench/docqa_grid.jsonl  # the Markdown table in RESULTS.md

Per length, one document: English Wikipedia (qwen2.eval.data.haystack_text, ~470K tokens; longer
lengths go on with the c4 and technical texts, then repeat) with three needles of different kinds
from qwen2.eval.niah, one in each third of the text at a seeded depth, and two chains of "X's
mentor was Y." facts (2 and 3 hops) among distractor facts of the same shape about other made-up
people, all at seeded positions. Each needle is asked at levels 1 and 2, each chain ("Who was the
mentor of the mentor of X?") at levels 1, 2 and 3.

Every length is one `qwen2 docqa FILE Q1 Q2 ... --level 1,...,2,...,3 --json` process, as a user
would run it: level 1 first, then level 2, whose first question reads the whole document cold;
later questions find the passages in the engine's prefix cache and compute only their own
question and reply. A reply is correct when it holds the answer (qwen2.eval.niah.score). Each
question prints one JSON line (wall seconds, chunks read, chunks/s, load average before and
after the process, since the cores may be shared) and is appended to --out; a length already in
--out is skipped, so an interrupted grid resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_step import cpu_name  # noqa: E402

from qwen2.eval.niah import CITIES, COLOURS, NAMES, NEEDLES, THINGS, WORDS, score  # noqa: E402
from qwen2.options import parse_tokens  # noqa: E402

SYLLABLES = ["ka", "lo", "mi", "ren", "sa", "tor", "vi", "dun", "mel", "ho", "zar", "pe", "quin", "bra", "les"]


def haystack(tokenizer, tokens: int) -> str:
    from qwen2.eval.data import haystack_text, load_text

    text = haystack_text()
    extra = ["c4", "technical"]
    while len(tokenizer.encode(text[: tokens * 6])) < tokens:  # ~4 characters a token; keep a margin
        text += "\n\n" + load_text(extra[0]) if extra else "\n\n" + text
        extra = extra[1:]
    cut = tokens * 4
    while len(tokenizer.encode(text[:cut])) < tokens:
        cut += tokens // 2
    return text[:cut]


def plant(text: str, facts: list[tuple[float, str]]) -> tuple[str, list[float]]:
    """Each fact after the first sentence end at or past its depth (a fraction of the text); the
    depths where they landed."""
    out, last, landed = [], 0, []
    for depth, fact in sorted(facts):
        at = max(text.find(". ", int(depth * len(text))) + 1 or len(text), last)
        out += [text[last:at], " " + fact]
        landed.append(at / len(text))
        last = at
    order = sorted(range(len(facts)), key=lambda i: facts[i])
    depths = [0.0] * len(facts)
    for rank, i in enumerate(order):
        depths[i] = landed[rank]
    return "".join(out + [text[last:]]), depths


def name(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(3)).capitalize()


def needle(rng: random.Random, kind: int) -> tuple[str, str, str]:
    fact, questions, answer = NEEDLES[kind % len(NEEDLES)]
    values = dict(word=rng.choice(WORDS), n4=rng.randrange(1000, 9999), n5=rng.randrange(10000, 99999),
                  n7=rng.randrange(10**6, 10**7), city=rng.choice(CITIES), colour=rng.choice(COLOURS),
                  name=rng.choice(NAMES), thing=rng.choice(THINGS))
    return fact.format(**values), rng.choice(questions).format(**values), answer.format(**values)


def chains(rng: random.Random, hops: list[int], distractors: int = 6) -> tuple[list[str], list[dict]]:
    """Facts for one chain per entry of `hops` plus distractor pairs, and a question per chain (with the
    indices of its facts)."""
    people: list[str] = []
    while len(people) < sum(h + 1 for h in hops) + 2 * distractors:
        if (n := name(rng)) not in people:
            people.append(n)
    facts, cases = [], []
    for h in hops:
        chain, people = people[: h + 1], people[h + 1:]
        question = f"Who was the mentor of {'the mentor of ' * (h - 1)}{chain[0]}?"
        cases.append(dict(kind="hops", hops=h, question=question, answer=chain[-1],
                          facts=list(range(len(facts), len(facts) + h))))
        facts += [f"{a}'s mentor was {b}." for a, b in zip(chain, chain[1:])]
    facts += [f"{a}'s mentor was {b}." for a, b in zip(people[::2], people[1::2])]
    return facts, cases


def build(tokenizer, length: int, needles: int, hops: list[int]) -> tuple[str, list[dict]]:
    """The document and its questions: dicts of kind, hops, question, answer and the depths of their facts."""
    rng = random.Random(f"docqa-{length}")
    planted, cases = [], []
    for i in range(needles):
        fact, question, answer = needle(rng, i)
        cases.append(dict(kind="niah", hops=0, question=question, answer=answer, facts=[len(planted)]))
        planted.append((rng.uniform(i / needles, (i + 1) / needles) * 0.98, fact))
    hop_facts, hop_cases = chains(rng, hops)
    for case in hop_cases:
        case["facts"] = [len(planted) + k for k in case["facts"]]
    planted += [(rng.random() * 0.98, fact) for fact in hop_facts]
    text, depths = plant(haystack(tokenizer, length), planted)
    for case in cases + hop_cases:
        case["depths"] = [round(depths[i], 3) for i in case.pop("facts")]
    return text, cases + hop_cases


def run_length(tokenizer, length: int, args: argparse.Namespace) -> list[dict]:
    text, cases = build(tokenizer, length, args.needles, [int(h) for h in args.hops.split(",") if h])
    levels = [int(x) for x in args.levels.split(",")]
    asked = [(level, case) for level in levels for case in cases if case["kind"] == "hops" or level < 3]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"haystack_{length}.txt"
        path.write_text(text)
        command = [sys.executable, "-m", "qwen2", "docqa", str(path), *[c["question"] for _, c in asked],
                   "--level", ",".join(str(level) for level, _ in asked), "--json", "--quant", args.quant,
                   "--max-concurrency", str(args.parallel), "--budget", str(args.budget),
                   "--retries", str(args.retries)]
        if args.kv_memory:
            command += ["--kv-memory", args.kv_memory]
        print("# " + " ".join(command[1:5] + [f"<{len(asked)} questions>"] + command[5 + len(asked):]), flush=True)
        load_before = os.getloadavg()[0]
        cells = []
        with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1]) as p:
            for line, (level, case) in zip(p.stdout, asked):
                result = json.loads(line)
                cell = dict(length=length, document_tokens=result["document_tokens"], level=level,
                            kind=case["kind"], hops=case["hops"], depths=case["depths"], question=case["question"],
                            answer=case["answer"], reply=result["answer"],
                            correct=score(result["answer"], case["answer"]),
                            seconds=round(result["seconds"], 1), chunks_read=result["chunks_read"],
                            rounds=result["rounds"], steps=result["steps"],
                            chunks_per_s=round(result["chunks_read"] / result["seconds"], 3)
                            if result["chunks_read"] else None,
                            evidence=[e["quote"][:200] for e in result["evidence"][:3]],
                            load_before=round(load_before, 1), load_now=round(os.getloadavg()[0], 1),
                            quant=args.quant, budget=args.budget, parallel=args.parallel, cpu=cpu_name())
                print(json.dumps(cell, ensure_ascii=False), flush=True)
                if args.out:
                    with args.out.open("a") as f:
                        f.write(json.dumps(cell, ensure_ascii=False) + "\n")
                cells.append(cell)
        if p.returncode:
            raise SystemExit(f"qwen2 docqa exited with {p.returncode} at length {length}")
    return cells


def label(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens < 2**20 else f"{tokens / 2**20:g}M"


def plot(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [json.loads(line) for line in path.open()]
    lengths = sorted({c["length"] for c in cells})
    rows = sorted({(c["kind"], c["hops"], c["level"]) for c in cells}, key=lambda r: (r[0] != "niah", r[1], r[2]))
    grid = [[[c["correct"] for c in cells if (c["kind"], c["hops"], c["level"]) == row and c["length"] == n]
             for n in lengths] for row in rows]
    fig, ax = plt.subplots(figsize=(2.2 + 1.1 * len(lengths), 0.9 + 0.45 * len(rows)))
    ax.imshow([[sum(x) / len(x) if x else float("nan") for x in r] for r in grid], cmap="RdYlGn", vmin=0, vmax=1,
              aspect="auto")
    for i, r in enumerate(grid):
        for j, x in enumerate(r):
            ax.text(j, i, f"{sum(x)}/{len(x)}" if x else "-", ha="center", va="center")
    ax.set_xticks(range(len(lengths)), [label(n) for n in lengths])
    ax.set_yticks(range(len(rows)), [f"needles, L{lv}" if k == "niah" else f"{h}-hop, L{lv}" for k, h, lv in rows])
    ax.set_title("docqa: found / asked", fontsize=10)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=120)
    return out


def table(path: Path) -> str:
    """The grid as a Markdown table, one row per question asked."""
    rows = ["| length (tokens) | question | depths | level | found | seconds | chunks read | chunks/s | reply |",
            "|---|---|---|---|---|---|---|---|---|"]
    for c in map(json.loads, path.open()):
        kind = "needle" if c["kind"] == "niah" else f"{c['hops']}-hop"
        reply = " ".join(c["reply"].split())[:70].replace("|", "/")
        depths = ", ".join(f"{d:.2f}" for d in c["depths"])
        rows.append(f"| {label(c['length'])} ({c['document_tokens']:,}) | {kind} | {depths} | {c['level']} | "
                    f"{'yes' if c['correct'] else 'no'} | {c['seconds']:,.0f} | {c['chunks_read'] or '-'} | "
                    f"{c['chunks_per_s'] or '-'} | {reply} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", default="32k", help="document lengths in tokens, comma-separated")
    p.add_argument("--levels", default="1,2,3", help="levels asked (needles stop at 2)")
    p.add_argument("--needles", type=int, default=3)
    p.add_argument("--hops", default="2,3", help="chain lengths, comma-separated (empty: needles only)")
    p.add_argument("--budget", default="4500")
    p.add_argument("--parallel", default="16", help="chunks read at once (a cached re-read is decode-bound: "
                   "a wide batch costs little more per step)")
    p.add_argument("--retries", default="2")
    p.add_argument("--quant", default="none", help="the model's weights, as `qwen2 docqa --quant` (level 2 is a "
                   "prefill of the whole document: on a CPU with native bf16, none (bf16) prefills fastest)")
    p.add_argument("--kv-memory", help="as `qwen2 docqa --kv-memory` (default: its own)")
    p.add_argument("--out", type=Path)
    p.add_argument("--plot", type=Path, metavar="JSONL", help="draw the heatmap of a finished grid and stop")
    p.add_argument("--table", type=Path, metavar="JSONL", help="print a finished grid as a Markdown table and stop")
    args = p.parse_args()
    if args.plot or args.table:
        print(plot(args.plot) if args.plot else table(args.table))
        return
    from qwen2.weights import load_tokenizer

    tokenizer = load_tokenizer()
    done = {json.loads(line)["length"] for line in args.out.open()} if args.out and args.out.exists() else set()
    for length in [parse_tokens(x) for x in args.lengths.split(",")]:
        if length in done:
            print(f"# {length} tokens: in {args.out} already", flush=True)
            continue
        run_length(tokenizer, length, args)


if __name__ == "__main__":
    main()
