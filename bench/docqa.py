"""The document agent on real prose: needle in a haystack and seeded multi-hop chains, per level.

    python bench/docqa.py niah --lengths 32k,128k --levels 1,2 --out bench/docqa_niah.jsonl
    python bench/docqa.py hops --length 16k --hops 2,3,4 --levels 1,2,3 --out bench/docqa_hops.jsonl

Haystack: English Wikipedia (qwen2.eval.data.haystack_text, ~470K tokens; longer lengths repeat it
after the c4 and technical texts). NIAH plants one needle from qwen2.eval.niah at a seeded depth and
asks its question. Hops plants a chain of 2 to 4 "X's mentor was Y." facts with distractor
facts of the same shape about other made-up people, scattered at seeded positions, and asks for
the mentor of the mentor (...) of the first person. A reply is correct when it holds the answer
(qwen2.eval.niah.score). Each cell prints one JSON line (wall seconds, chunks read, chunks/s,
the 1-minute load average before and after, since the cores may be shared) and appends it to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen2.agent import DocQA  # noqa: E402
from qwen2.agent.documents import Source  # noqa: E402
from qwen2.eval.niah import NEEDLES, score  # noqa: E402
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


def plant(text: str, sentences: list[str], rng: random.Random) -> str:
    """Each sentence after a sentence end at a random position (kept in the given order)."""
    spots = sorted(rng.randrange(len(text)) for _ in sentences)
    out, last = [], 0
    for spot, sentence in zip(spots, sentences):
        at = text.find(". ", spot) + 1 or len(text)
        at = max(at, last)
        out += [text[last:at], " " + sentence]
        last = at
    return "".join(out + [text[last:]])


def name(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(3)).capitalize()


def needle_case(rng: random.Random) -> tuple[list[str], str, str]:
    fact, questions, answer = rng.choice(NEEDLES)
    values = dict(word=rng.choice(["amber", "falcon", "juniper", "cobalt"]), n4=rng.randrange(1000, 9999),
                  n5=rng.randrange(10000, 99999), n7=rng.randrange(10**6, 10**7), city=rng.choice(["Lisbon", "Osaka"]),
                  colour=rng.choice(["teal", "violet"]), name=rng.choice(["Okafor", "Novak"]),
                  thing=rng.choice(["tin kettle", "birdhouse"]))
    return [fact.format(**values)], rng.choice(questions).format(**values), answer.format(**values)


def hop_case(rng: random.Random, hops: int, distractors: int = 6) -> tuple[list[str], str, str]:
    people = []
    while len(people) < hops + 1 + 2 * distractors:
        if (n := name(rng)) not in people:
            people.append(n)
    chain, rest = people[: hops + 1], people[hops + 1:]
    facts = [f"{a}'s mentor was {b}." for a, b in zip(chain, chain[1:])]
    facts += [f"{a}'s mentor was {b}." for a, b in zip(rest[::2], rest[1::2])]
    rng.shuffle(facts)
    question = f"Who was the mentor of {'the mentor of ' * (hops - 1)}{chain[0]}?"
    return facts, question, chain[-1]


def run_cell(qa: DocQA, tokenizer, kind: str, length: int, level: int, seed: int, hops: int, out: Path | None) -> dict:
    rng = random.Random(f"{kind}-{length}-{hops}-{seed}")
    facts, question, answer = needle_case(rng) if kind == "niah" else hop_case(rng, hops)
    text = plant(haystack(tokenizer, length), facts, rng)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    result = qa.ask([Source(f"{kind}.txt", text)], question, level=level)
    seconds = time.perf_counter() - t0
    cell = dict(kind=kind, length=length, document_tokens=result.document_tokens, level=level, hops=hops, seed=seed,
                question=question, answer=answer, reply=result.answer, correct=score(result.answer, answer),
                seconds=round(seconds, 1), chunks_read=result.chunks_read, rounds=result.rounds,
                steps=result.steps, chunks_per_s=round(result.chunks_read / seconds, 3) if result.chunks_read else None,
                load_before=round(load_before, 1), load_after=round(os.getloadavg()[0], 1), budget=qa.budget)
    print(json.dumps(cell, ensure_ascii=False), flush=True)
    if out:
        with out.open("a") as f:
            f.write(json.dumps(cell, ensure_ascii=False) + "\n")
    return cell


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("kind", choices=["niah", "hops"])
    p.add_argument("--lengths", default="32k", help="document lengths in tokens, comma-separated")
    p.add_argument("--levels", default="1,2")
    p.add_argument("--hops", default="2", help="hops: chain lengths, comma-separated")
    p.add_argument("--seeds", type=int, default=1, help="cases per cell")
    p.add_argument("--budget", type=parse_tokens, default=4500)
    p.add_argument("--parallel", type=int, default=4)
    p.add_argument("--retries", type=int, default=2)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--quant", default="auto", help="the model's weights, as `qwen2 docqa --quant` (level 2 is a "
                   "prefill of the whole document: on a CPU with native bf16, none (bf16) prefills fastest)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    import torch

    from qwen2.loading import load

    if args.threads:
        torch.set_num_threads(args.threads)
    llm = load(quant=args.quant, max_slots=args.parallel)
    qa = DocQA(llm, budget=args.budget, retries=args.retries)
    print(f"# {os.uname().machine}, {torch.get_num_threads()} threads, quant {args.quant}, budget {args.budget}, "
          f"{args.parallel} slots, loaded in {llm.load_seconds:.1f}s", flush=True)
    for length in [parse_tokens(x) for x in args.lengths.split(",")]:
        for hops in [int(h) for h in args.hops.split(",")] if args.kind == "hops" else [0]:
            for level in [int(x) for x in args.levels.split(",")]:
                for seed in range(args.seeds):
                    run_cell(qa, llm.tokenizer, args.kind, length, level, seed, hops, args.out)


if __name__ == "__main__":
    main()
