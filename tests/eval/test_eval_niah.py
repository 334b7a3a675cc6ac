"""Needle in a haystack without real weights: scoring, prompt construction on the real Wikipedia
haystack and real tokenizer, the resumable grid and the over-long prompt (tiny random model)."""

import json

import pytest

from qwen2.engine.engine import Engine
from qwen2.engine.llm import LLM
from qwen2.errors import Qwen2Error, RequestError
from qwen2.eval.data import haystack_text
from qwen2.eval.niah import (
    Haystack,
    accuracy,
    build_prompt,
    format_table,
    run_grid,
    save_heatmap,
    score,
    split_sentences,
)


@pytest.mark.parametrize("reply, answer, expected", [
    ("amber-4721", "amber-4721", True),
    ("The passphrase is AMBER-4721.", "amber-4721", True),            # case, sentence around it
    ("amber 4721", "amber-4721", True),                               # punctuation inside
    ('"Amber-4721"!', "amber-4721", True),
    ("The special magic number for Lisbon is 1,234,567.", "1234567", True),  # thousands separators
    ("The vault's passphrase is amber-4722.", "amber-4721", False),   # wrong number
    ("amber-47210", "amber-4721", False),                             # not a whole word
    ("It is 91234567.", "1234567", False),
    ("Inside a watering can, behind the door.", "watering can", True),
    ("I could not find it in the document.", "watering can", False),
])  # fmt: skip
def test_score(reply, answer, expected):
    assert score(reply, answer) is expected


def test_sentences_concatenate_to_the_text():
    text = "First one. Second one!\nA heading\n\nThird? Fourth.  Fifth"
    pieces = split_sentences(text)
    assert "".join(pieces) == text
    assert pieces[:3] == ["First one.", " Second one!\n", "A heading\n\n"]


@pytest.fixture(scope="module")
def haystack(default_tokenizer):
    return Haystack(default_tokenizer, haystack_text())


@pytest.mark.parametrize("length", [2048, 8192])
@pytest.mark.parametrize("depth", [0, 25, 50, 100])
def test_prompt_has_the_length_and_the_needle_at_its_depth(haystack, length, depth):
    tokenizer = haystack.tokenizer
    prompt = build_prompt(haystack, length, depth, needle=depth // 25)
    longest_sentence = max(b - a for a, b in zip([0] + haystack.ends, haystack.ends))
    assert length - longest_sentence - 8 <= prompt.tokens <= length
    assert prompt.tokens == len(tokenizer.encode(prompt.text))
    # the needle sits at the sentence boundary nearest depth% of the document's tokens
    doc_start = len(tokenizer.encode(prompt.text[: prompt.text.index("<document>\n") + 11]))
    doc_end = len(tokenizer.encode(prompt.text[: prompt.text.index("\n</document>")]))
    needle_tokens = len(tokenizer.encode(" " + prompt.fact))
    target = doc_start + depth / 100 * (doc_end - doc_start - needle_tokens)
    assert abs(prompt.needle_token - target) <= longest_sentence + 2
    assert prompt.answer in prompt.text and prompt.question in prompt.text


@pytest.fixture(scope="module")
def tiny_llm(tiny_model, default_tokenizer):
    # tiny_config allows 512 positions: prompts of a few hundred tokens
    return LLM(tiny_model, default_tokenizer, Engine(tiny_model, default_tokenizer, max_concurrency=1, max_seq_len=512,
                                                     prefill_chunk=128))


def test_grid_is_resumable(tiny_llm, haystack, tmp_path, monkeypatch):
    out, settings = tmp_path / "niah.json", {"model": "tiny"}
    grid = dict(lengths=[256, 384], depths=[0, 100], needles=1, out=out, settings=settings, haystack=haystack,
                max_tokens=4, progress=False)
    full = run_grid(tiny_llm, **grid)
    assert len(full) == 4 and json.loads(out.read_text())["cells"] == full
    # as if interrupted after two cells: the rerun asks only the other two
    out.write_text(json.dumps({"settings": settings, "cells": full[:2]}))
    calls = []
    generate = tiny_llm.generate
    monkeypatch.setattr(tiny_llm, "generate", lambda *a, **k: calls.append(a) or generate(*a, **k))
    resumed = run_grid(tiny_llm, **grid)
    assert len(calls) == 2
    assert resumed[:2] == full[:2]
    assert [(c["length"], c["depth"]) for c in resumed] == [(c["length"], c["depth"]) for c in full]
    assert run_grid(tiny_llm, **grid) == resumed and len(calls) == 2  # all done: nothing runs
    with pytest.raises(Qwen2Error, match="other settings"):
        run_grid(tiny_llm, **(grid | {"settings": {"model": "other"}}))


def test_table_and_heatmap(tmp_path):
    pytest.importorskip("matplotlib")
    cells = [dict(length=n, depth=d, needle=k, correct=(n, d, k) != (4096, 50, 1))
             for n in (2048, 4096) for d in (0, 50) for k in (0, 1)]
    table = format_table(cells)
    assert table.splitlines()[0].split()[-2:] == ["2K", "4K"]
    # Wilson by hand: 2 of 2 is 0.3424 to 1, 1 of 2 is 0.0945 to 0.9055
    assert table.splitlines()[2].split() == ["50%", "1.00", "[0.34,1.00]", "0.50", "[0.09,0.91]"]
    assert accuracy(cells)[2][1][1] == {"needles": 2, "correct": 1, "accuracy": 0.5, "ci95": [0.0945, 0.9055]}
    save_heatmap(cells, tmp_path / "h.png")
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_over_long_prompt_names_the_limit(tiny_llm, haystack):
    with pytest.raises(RequestError, match="context holds 512"):
        run_grid(tiny_llm, [1024], [50], haystack=haystack, progress=False)
