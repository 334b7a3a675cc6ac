"""Strided perplexity through the chunked KV-cache forward equals the Hugging Face guide's loop
(one full forward per window, cross-entropy over the tokens the window scores)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from qwen2.errors import OptionError
from qwen2.eval.perplexity import mean_nll, perplexity, perplexity_ci, token_nlls, windows
from qwen2.model import Transformer
from tests.conftest import tiny_config

VOCAB = 1024  # a small vocabulary keeps the (tokens x vocab) logits cheap; chunking is what is tested


def guide_nll(model, ids: torch.Tensor, ctx: int, stride: int) -> float:
    """The loop of the HF perplexity guide, with an exact count of the scored tokens: the mean
    negative log-likelihood whose exp is the perplexity."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + ctx, len(ids))
        window = ids[begin:end]
        labels = window.clone()
        labels[: len(window) - (end - prev_end)] = -100  # scored by an earlier window: context only
        with torch.no_grad():
            logits = model(window[None])[0]
        nll += F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum").item()
        count += int((labels[1:] != -100).sum())
        prev_end = end
        if end == len(ids):
            break
    return nll / count


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=VOCAB)).eval()
    with torch.no_grad():  # sharper logits than the default init
        model.model.embed_tokens.weight.normal_(0, 1.0)
    return model


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (450,), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("ctx, stride, chunk", [
    (64, 32, 512),    # one chunk per window
    (64, 64, 512),    # non-overlapping windows
    (100, 40, 32),    # windows of several chunks, scored part starting mid-chunk
    (300, None, 64),  # default stride ctx // 2
    (500, 250, 128),  # ctx longer than the text: one window
])  # fmt: skip
def test_equals_full_forward_per_window(model, ids, ctx, stride, chunk):
    # Negative log-likelihoods, not perplexities: a random model's perplexity is near 1e27, where
    # a summation order that differs with the CPU's vector width moves the exp far more than 1e-5.
    got = mean_nll(model, ids.tolist(), ctx, stride, chunk=chunk)
    assert got == pytest.approx(guide_nll(model, ids, ctx, stride or ctx // 2), rel=1e-5, abs=1e-4)
    assert perplexity(model, ids.tolist(), ctx, stride, chunk=chunk) == pytest.approx(math.exp(got), rel=1e-4)


@pytest.mark.parametrize("n, ctx, stride", [(10, 4, 2), (10, 4, 1), (9, 3, 3), (5, 8, 4), (17, 6, 5)])
def test_windows_score_each_token_once(n, ctx, stride):
    scored = [t for begin, end, first in windows(n, ctx, stride) for t in range(first, end)]
    # every token but the first, except (without overlap) each window's first token
    expected = [t for t in range(1, n) if stride < ctx or t % ctx]
    assert scored == expected
    assert all(end - begin <= ctx for begin, end, _ in windows(n, ctx, stride))


def test_rejects_ctx_beyond_the_context_limit(model, ids):
    with pytest.raises(OptionError, match="a window of 1024 tokens exceeds the model's context limit of 512"):
        perplexity(model, ids.tolist(), 1024)
    with pytest.raises(OptionError, match="stride must be between 1 and the window length 64, got 65"):
        perplexity(model, ids.tolist(), 64, stride=65)


def test_token_nlls_are_the_scored_tokens_and_bound_the_perplexity(model, ids):
    nlls = token_nlls(model, ids.tolist(), 64, 32)
    assert len(nlls) == sum(end - first for _, end, first in windows(len(ids), 64, 32)) == 449
    assert float(nlls.double().mean()) == pytest.approx(mean_nll(model, ids.tolist(), 64, 32), rel=1e-6)
    low, high = perplexity_ci(nlls, block=64)
    assert low < perplexity(model, ids.tolist(), 64, 32) < high
    assert perplexity_ci(torch.full((100,), 2.0), block=10) == pytest.approx((math.exp(2), math.exp(2)))


def test_the_ppl_command_reports_each_window_length_with_its_interval(tiny_hf, tmp_path, capsys):
    from qwen2.cli import main

    (tmp_path / "t.txt").write_text("".join(f"Line {i}: the quick brown fox jumps over dog {i * 7}.\n"
                                            for i in range(200)))
    main(["eval", "ppl", str(tmp_path / "t.txt"), "--model", str(tiny_hf), "--ctx", "128,256", "--max-tokens", "1536"])
    rows = json.loads(capsys.readouterr().out.splitlines()[-1])["results"]
    assert [r["ctx"] for r in rows] == [128, 256] and all(r["scored"] == 1535 for r in rows)
    assert all(r["ci95"][0] < r["ppl"] < r["ci95"][1] for r in rows)  # three stretches of 512 tokens
