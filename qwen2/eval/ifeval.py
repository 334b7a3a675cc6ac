"""Instruction following, IFEval-style, on prompts we generate ourselves (IFEval's own 541 prompts
are not shipped in any package we can fetch).

A prompt is a task from llamafactory's alpaca_en_demo (its instruction, and its input below it
when there is one) followed by one to three constraints drawn at random from
qwen2.eval.instructions (`prompt_text`), so the reply can be checked by a program. Drawing is
seeded per item (`random.Random(f"{split}:{seed}:{index}")`), so an item never changes with
--limit and a seed always gives the same set. Constraints that contradict each other never
share a prompt: one per family (one length, one format, one keyword, one case), and no
language with a case, a length, keywords or English phrases, no JSON with a phrase, paragraphs
or a comma ban, no quotes around a start or end phrase.

The eval draws from the tasks at even positions in the file (500), the data command
(`qwen2 data instruct-feedback`) from those at odd positions that are no eval task's text (493):
training data never holds an eval task. Item ids name the split and seed ("eval0-12"), so `qwen2 eval compare` pairs
only identical prompts.

Scores, as IFEval defines them: prompt-level (every constraint of a prompt met; an item's
`correct`) and instruction-level (each constraint on its own), strict and loose (see
instructions.py), with Wilson 95% intervals, and per constraint kind. Instruction-level
intervals treat the constraints as independent; those of one reply are not, so they are
somewhat too narrow. Replies are greedy; one cut off by --max-tokens is judged as it stands.
"""

from __future__ import annotations

import json
import random

from qwen2.engine.sampling import SamplingParams
from qwen2.eval.harness import Results, generate_all
from qwen2.eval.instructions import KINDS, LANGUAGES, RELATIONS, prompt_text, verdicts
from qwen2.eval.stats import percent_ci, wilson

SPLITS = ("eval", "train")  # tasks at even / odd positions of alpaca_en_demo
_TOPICS = ("example", "future", "simple", "important", "people", "quality", "history", "balance", "energy",
           "community", "nature", "growth")
_AVOID = ("very", "really", "also", "however", "important", "example", "like", "just", "many", "can")
_STARTS = ("My answer is:", "Here is what I think:", "Great question!", "In short,")
_ENDS = ("Is there anything else I can help with?", "Hope this helps.", "That is all.", "Any other questions?")
_DRAW = {
    "length:max_words": lambda r: {"n": r.choice((25, 50, 80, 120))},
    "length:min_words": lambda r: {"n": r.choice((50, 100, 150, 200))},
    "length:sentences": lambda r: {"n": r.randint(2, 8), "relation": r.choice(RELATIONS)},
    "paragraphs:count": lambda r: {"n": r.randint(2, 5)},
    "format:bullets": lambda r: {"n": r.randint(2, 6)},
    "format:sections": lambda r: {"n": r.randint(2, 4), "splitter": r.choice(("Section", "SECTION", "Part"))},
    "format:highlights": lambda r: {"n": r.randint(1, 3)},
    "keywords:include": lambda r: {"words": r.sample(_TOPICS, r.randint(1, 2))},
    "keywords:exclude": lambda r: {"words": r.sample(_AVOID, r.randint(1, 2))},
    "keywords:frequency": lambda r: {"word": r.choice(_TOPICS), "n": r.randint(2, 4), "relation": r.choice(RELATIONS)},
    "start:phrase": lambda r: {"phrase": r.choice(_STARTS)},
    "end:phrase": lambda r: {"phrase": r.choice(_ENDS)},
}
# (kind or family, kind or family) that contradict each other, besides two of one family
_CLASHES = {("language", family) for family in ("case", "length", "keywords", "start", "end")} | {
    ("format:json", family) for family in ("punctuation", "start", "end", "paragraphs")} | {
    ("format:quoted", "start"), ("format:quoted", "end")}
_DRAWN = [kind for kind in KINDS if not kind.startswith("language:")] + ["language"]  # every language one family


def _family(kind: str) -> str:
    return kind.split(":")[0]


def clash(a: str, b: str) -> bool:
    if _family(a) == _family(b):
        return True
    return any(pair in _CLASHES for x in (a, _family(a)) for y in (b, _family(b)) for pair in ((x, y), (y, x)))


def draw_constraints(rng: random.Random) -> list[dict]:
    """One to three constraints that can all be met at once."""
    count, chosen = rng.randint(1, 3), []
    for kind in rng.sample(_DRAWN, len(_DRAWN)):
        if kind == "language":
            kind = f"language:{rng.choice(list(LANGUAGES))}"
        if len(chosen) < count and not any(clash(kind, c["kind"]) for c in chosen):
            chosen.append({"kind": kind, **_DRAW.get(kind, lambda _r: {})(rng)})
    return chosen


def tasks() -> list[str]:
    from qwen2.train.datasets import data_path

    rows = json.loads(data_path("alpaca_en_demo").read_text(encoding="utf-8"))
    return [r["instruction"].strip() + (f"\n\n{r['input'].strip()}" if r["input"].strip() else "") for r in rows]


def prompt_set(split: str = "eval", seed: int = 0) -> list[dict]:
    """The generated items of a split: {id, task, constraints, prompt}."""
    every, items = tasks(), []
    held_out = set(every[::2]) if split == "train" else set()  # alpaca repeats a few tasks at odd and even places
    for index, task in enumerate(every):
        if index % 2 == SPLITS.index(split) and task not in held_out:
            constraints = draw_constraints(random.Random(f"{split}:{seed}:{index}"))
            items.append(dict(id=f"{split}{seed}-{index}", task=task, constraints=constraints,
                              prompt=prompt_text(task, constraints)))
    return items


def score(item: dict, reply: str) -> dict:
    strict, loose = verdicts(reply, item["constraints"]), verdicts(reply, item["constraints"], loose=True)
    return dict(id=item["id"], prompt=item["prompt"], constraints=item["constraints"], reply=reply, strict=strict,
                loose=loose, correct=all(strict), correct_loose=all(loose))


def run(llm, items: list[dict], results: Results, max_tokens: int) -> None:
    todo = {item["id"]: item for item in items if item["id"] not in results}
    prompts = {key: [{"role": "user", "content": item["prompt"]}] for key, item in todo.items()}
    generate_all(llm, prompts, lambda _key: SamplingParams(max_tokens=max_tokens, temperature=0),
                 lambda key, text: results.add(score(todo[key], text)), desc="ifeval")


def _rate(passed: int, total: int) -> dict:
    return dict(accuracy=round(100 * passed / total, 2) if total else 0.0, ci95=percent_ci(*wilson(passed, total)))


def _strict_and_loose(verdicts_: list[tuple[bool, bool]]) -> dict:
    return dict(strict=_rate(sum(s for s, _ in verdicts_), len(verdicts_)),
                loose=_rate(sum(loose for _, loose in verdicts_), len(verdicts_)))


def summarize(records: list[dict]) -> dict:
    kinds: dict[str, list[tuple[bool, bool]]] = {}
    for r in records:
        for c, strict, loose in zip(r["constraints"], r["strict"], r["loose"]):
            kinds.setdefault(c["kind"], []).append((strict, loose))
    flat = [v for pairs in kinds.values() for v in pairs]
    return dict(prompts=len(records), instructions=len(flat),
                prompt=_strict_and_loose([(r["correct"], r["correct_loose"]) for r in records]),
                instruction=_strict_and_loose(flat),
                kinds={kind: dict(count=len(v), **_strict_and_loose(v)) for kind, v in sorted(kinds.items())})
