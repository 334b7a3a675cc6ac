"""The long-context evals on the embedded default model (Qwen2.5-Coder-0.5B-Instruct)."""

import pytest

from qwen2.errors import RequestError
from qwen2.eval.data import haystack_text
from qwen2.eval.niah import run_grid
from qwen2.eval.perplexity import perplexity


@pytest.fixture(scope="module")
def llm(default_gguf):
    from qwen2 import load

    return load(default_gguf, quant="none", max_concurrency=1, ctx=4096)


def test_finds_the_needle_in_2k_tokens(llm):
    (cell,) = run_grid(llm, [2048], [50], progress=False)
    assert 1900 <= cell["prompt_tokens"] <= 2048
    assert cell["correct"], (cell["answer"], cell["reply"])


def test_over_long_prompt_names_the_limit(llm):
    with pytest.raises(RequestError, match="the context holds 4096"):
        run_grid(llm, [8192], [50], progress=False)


def test_wikipedia_perplexity_is_plausible(llm):
    ids = llm.tokenizer.encode(haystack_text()[:4000])[:384]
    short, full = perplexity(llm, ids, 128, stride=128), perplexity(llm, ids, 384)
    assert 2 < full < 40
    assert full < short * 1.05  # more context should not hurt
