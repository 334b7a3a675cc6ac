"""Needle in a haystack on real prose: can the model retrieve one planted fact from a long prompt?

The haystack is English Wikipedia (qwen2.eval.data), cut at a sentence boundary so that the
whole chat prompt has the target token length. One needle sentence (a passphrase, a magic
number, an access code, a hiding place; values drawn per cell from a seeded RNG) is inserted
at the sentence boundary nearest `depth` percent of the document, and a question about it
follows the document. The prompt goes through the chat template and the engine (chunked
prefill, prefix cache, context limit), is greedily decoded for a few dozen tokens, and the
reply is correct when it contains the answer after normalising case and punctuation.

Grid: lengths x depths x needles; a cell's accuracy (over its needles) comes with its Wilson
95% interval, wide unless --needles is raised. Each finished cell is written to the results JSON at once,
and a rerun with the same file skips the cells already there.
Not covered: multiple needles in one prompt, distractors, or scoring beyond string matching.
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from qwen2.errors import OptionError
from qwen2.eval.data import haystack_text
from qwen2.eval.stats import wilson
from qwen2.files import write_text_atomically
from qwen2.memory import peak_rss_mib, reset_peak_rss
from qwen2.tokenizer import Tokenizer

# (fact, question phrasings, answer); placeholders are filled per cell in `build_prompt`
NEEDLES = [
    ("The secret passphrase for the vault is {word}-{n4}.",
     ("What is the secret passphrase for the vault?", "Which passphrase opens the vault?",
      "What passphrase does the document give for the vault?"), "{word}-{n4}"),
    ("The special magic number for {city} is {n7}.",
     ("What is the special magic number for {city}?", "Which magic number does the document mention for {city}?"),
     "{n7}"),
    ("The access code for the {colour} door of the old lighthouse is {n5}.",
     ("What is the access code for the {colour} door of the old lighthouse?",
      "Which code opens the {colour} door of the old lighthouse?"), "{n5}"),
    ("Professor {name} hid the spare key inside a {thing} in the garden shed.",
     ("Where in the garden shed did Professor {name} hide the spare key?",
      "What object in the garden shed holds Professor {name}'s spare key?"), "{thing}"),
]
WORDS = ["amber", "falcon", "juniper", "cobalt", "meadow", "lantern", "orchid", "granite", "harbor", "velvet"]
CITIES = ["Lisbon", "Nairobi", "Osaka", "Quito", "Tallinn", "Perth", "Montreal", "Seville", "Hanoi", "Bergen"]
COLOURS = ["crimson", "teal", "yellow", "violet", "silver", "orange"]
NAMES = ["Okafor", "Lindqvist", "Moreau", "Takahashi", "Novak", "Alvarez"]
THINGS = ["watering can", "flower pot", "rubber boot", "tin kettle", "birdhouse", "paint bucket"]

INSTRUCTION = "Read the document below, then answer the question that follows it."
# split before the space after a sentence end and after each run of newlines: the cut never
# falls inside a token (" The" and ".\n" are single tokens), so sentence token counts add up
_SENTENCE_END = re.compile(r"(?<=[.!?])(?= )|(?<=\n)(?=[^\n])")


def normalise(text: str) -> str:
    text = re.sub(r"(?<=\d),(?=\d)", "", text.lower())  # 1,234,567 -> 1234567
    return " ".join(re.sub(r"\W+|_", " ", text).split())


def score(reply: str, answer: str) -> bool:
    """The answer appears in the reply as whole words, ignoring case and punctuation."""
    return f" {normalise(answer)} " in f" {normalise(reply)} "


def split_sentences(text: str) -> list[str]:
    """Pieces whose concatenation is `text`; a sentence with the space before it and the newlines after it."""
    return [s for s in _SENTENCE_END.split(text) if s]


class Haystack:
    """A long text as sentences with (lazily counted) token lengths, to cut it at boundaries."""

    def __init__(self, tokenizer: Tokenizer, text: str):
        self.tokenizer = tokenizer
        self.sentences = split_sentences(text)
        self.ends: list[int] = []  # ends[i]: tokens in sentences[: i + 1]

    def take(self, n_tokens: int) -> tuple[list[str], list[int]]:
        """The longest run of leading sentences with at most n_tokens tokens, and their `ends`."""
        while (not self.ends or self.ends[-1] <= n_tokens) and len(self.ends) < len(self.sentences):
            count = len(self.tokenizer.encode(self.sentences[len(self.ends)]))
            self.ends.append((self.ends[-1] if self.ends else 0) + count)
        n = sum(1 for end in self.ends if end <= n_tokens)
        if n == len(self.sentences) and self.ends[-1] < n_tokens:
            raise OptionError(f"the haystack holds only {self.ends[-1]} tokens, less than the {n_tokens} asked for")
        return self.sentences[:n], self.ends[:n]


@dataclass
class Prompt:
    text: str
    tokens: int  # prompt length in tokens
    needle_token: int  # index of the needle's first token in the prompt
    fact: str  # the needle sentence
    question: str
    answer: str


def build_prompt(haystack: Haystack, length: int, depth: float, needle: int) -> Prompt:
    """A chat prompt of about `length` tokens with needle number `needle` at `depth` percent."""
    tokenizer = haystack.tokenizer
    rng = random.Random(f"{length}-{depth}-{needle}")  # same cell, same values, across runs
    values = dict(word=rng.choice(WORDS), n4=rng.randint(1000, 9999), n5=rng.randint(10000, 99999),
                  n7=rng.randint(1_000_000, 9_999_999), city=rng.choice(CITIES), colour=rng.choice(COLOURS),
                  name=rng.choice(NAMES), thing=rng.choice(THINGS))
    fact, questions, answer = NEEDLES[needle % len(NEEDLES)]
    fact, question, answer = fact.format(**values), rng.choice(questions).format(**values), answer.format(**values)

    def render(document: str) -> str:
        content = f"{INSTRUCTION}\n\n<document>\n{document}\n</document>\n\nQuestion: {question}"
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    overhead = len(tokenizer.encode(render(fact)))
    sentences, ends = haystack.take(length - overhead)
    total = ends[-1] if ends else 0
    cut = min(range(len(ends) + 1), key=lambda i: abs((ends[i - 1] if i else 0) - total * depth / 100))
    before, after = "".join(sentences[:cut]), "".join(sentences[cut:])
    # a space wherever the neighbour has none: a paragraph's first sentence starts without one
    document = before + (" " if before[-1:].strip() else "") + fact + (" " if after[:1].strip() else "") + after
    text = render(document)
    needle_token = len(tokenizer.encode(text[: text.index(fact)]))
    return Prompt(text, len(tokenizer.encode(text)), needle_token, fact, question, answer)


def run_cell(llm, haystack: Haystack, length: int, depth: float, needle: int, max_tokens: int = 32) -> dict:
    """Ask one needle question through the engine; the record written to the results file."""
    prompt = build_prompt(haystack, length, depth, needle)
    reset_peak_rss()
    start = time.perf_counter()
    done = llm.generate(prompt.text, max_tokens=max_tokens, temperature=0)
    seconds = time.perf_counter() - start
    return dict(length=length, depth=depth, needle=needle, prompt_tokens=done.prompt_tokens,
                cached_tokens=done.cached_tokens, needle_token=prompt.needle_token, question=prompt.question,
                answer=prompt.answer, reply=done.text, correct=score(done.text, prompt.answer),
                seconds=round(seconds, 2), peak_rss_mib=round(peak_rss_mib()))


def load_results(path: Path | None, settings: dict) -> list[dict]:
    """The cells already in `path`; refuses a file made with other settings (model, scaling...)."""
    if path is None or not path.exists():
        return []
    saved = json.loads(path.read_text())
    if saved.get("settings") != settings:
        raise OptionError(f"{path} holds results for other settings ({saved.get('settings')}, now {settings}); "
                         "give another --out or delete it")
    return saved["cells"]


def save_results(path: Path, settings: dict, cells: list[dict]) -> None:
    write_text_atomically(path, json.dumps({"settings": settings, "cells": cells}, indent=1))  # never half a file


def run_grid(llm, lengths: list[int], depths: list[float], needles: int = 1, out: Path | None = None,
             settings: dict | None = None, haystack: Haystack | None = None, max_tokens: int = 32,
             progress: bool = True) -> list[dict]:
    """Run every (length, depth, needle) cell not yet in `out`, saving after each; all cells.

    Cells run by length, then depth from deep to shallow, so consecutive prompts share the
    haystack before the needle and the engine's prefix cache skips that part of the prefill.
    """
    settings = settings or {}
    haystack = haystack or Haystack(llm.tokenizer, haystack_text())
    cells = load_results(out, settings)
    done = {(c["length"], c["depth"], c["needle"]) for c in cells}
    todo = [(n_tok, d, k) for n_tok in sorted(lengths) for d in sorted(depths, reverse=True) for k in range(needles)
            if (n_tok, d, k) not in done]
    for length, depth, needle in tqdm(todo, desc="niah", disable=not progress):
        cells.append(run_cell(llm, haystack, length, depth, needle, max_tokens))
        if out is not None:
            save_results(out, settings, cells)
    return cells


def accuracy(cells: list[dict]) -> tuple[list[int], list[float], list[list[dict | None]]]:
    """(lengths, depths, grid[depth][length]) where a grid cell holds its needles, how many were
    found, the accuracy and its Wilson 95% interval (fractions); None where nothing ran. One
    needle a cell gives an interval of 0.21-1 or 0-0.79: run more (--needles) to narrow it."""
    lengths, depths = sorted({c["length"] for c in cells}), sorted({c["depth"] for c in cells})
    grid: list[list[dict | None]] = []
    for d in depths:
        row = []
        for n_tok in lengths:
            hits = [c["correct"] for c in cells if c["length"] == n_tok and c["depth"] == d]
            row.append(dict(needles=len(hits), correct=sum(hits), accuracy=round(sum(hits) / len(hits), 4),
                            ci95=[round(x, 4) for x in wilson(sum(hits), len(hits))]) if hits else None)
        grid.append(row)
    return lengths, depths, grid


def tokens_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def format_table(cells: list[dict]) -> str:
    """The accuracy of each (depth, length) cell with its 95% interval in brackets."""
    def cell(a: dict | None) -> str:
        return "-" if a is None else f"{a['accuracy']:.2f} [{a['ci95'][0]:.2f},{a['ci95'][1]:.2f}]"

    lengths, depths, grid = accuracy(cells)
    lines = ["depth \\ length " + "".join(f"{tokens_label(n):>18}" for n in lengths)]
    for d, row in zip(depths, grid):
        lines.append(f"{d:>13g}% " + "".join(f"{cell(a):>18}" for a in row))
    return "\n".join(lines)


def save_heatmap(cells: list[dict], path: Path, title: str = "Needle in a haystack") -> None:
    try:
        import matplotlib
    except ImportError:
        raise OptionError("the heatmap needs matplotlib: pip install 'qwen2[eval]'") from None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    lengths, depths, grid = accuracy(cells)
    values = [[float("nan") if a is None else a["accuracy"] for a in row] for row in grid]
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2.5, 0.6 * len(depths) + 1.8))
    image = ax.imshow(values, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [tokens_label(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("needle depth")
    for i, row in enumerate(grid):
        for j, a in enumerate(row):
            ax.text(j, i, "-" if a is None else f"{a['accuracy']:.2f}", ha="center", va="center")
    fig.colorbar(image, ax=ax, label="accuracy")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
