"""Strided (sliding-window) perplexity, as in the Hugging Face perplexity guide, in bounded memory.

Windows of `ctx` tokens start every `stride` tokens. Each window scores only the tokens no
earlier window scored, so every token but the first is scored once, with at least
ctx - stride tokens of context (all of its preceding tokens in the first window). With
stride == ctx the windows do not overlap and each window's first token goes unscored, as in
the guide.

A window runs as a chunked prefill through a one-slot KVCache, `chunk` tokens at a time,
so memory grows with ctx only through the cache: the (chunk x vocab) logits of one chunk
are reduced to a sum of negative log-likelihoods before the next chunk runs, and chunks
that score nothing (the context part of a window) compute the logits of one position only.

`perplexity_ci` bounds a perplexity by a bootstrap over contiguous stretches of the scored tokens
(qwen2.eval.stats.block_bootstrap_ci): how much it moves across this text's stretches, not how it
would come out on another text.
"""

from __future__ import annotations

import math

import torch

from qwen2.errors import OptionError
from qwen2.eval.stats import block_bootstrap_ci
from qwen2.model import KVCache, Transformer

BLOCK = 512  # tokens per resampled stretch: a few paragraphs


def windows(n_tokens: int, ctx: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored token) of each window over n_tokens; it scores [first, end)."""
    if not 1 <= stride <= ctx:
        raise OptionError(f"the stride must be between 1 and the window length {ctx}, got {stride}")
    spans, scored_to = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + ctx, n_tokens)
        spans.append((begin, end, max(scored_to, begin + 1)))  # a window's first token has no context
        scored_to = end
        if end == n_tokens:
            break
    return spans


def perplexity(llm_or_model, token_ids: list[int] | torch.Tensor, ctx: int, stride: int | None = None,
               chunk: int = 512) -> float:
    """Perplexity of `token_ids` under windows of `ctx` tokens advancing by `stride` (default ctx//2).

    `llm_or_model`: an LLM (from qwen2.load) or a Transformer; its rope scaling / DCA apply.
    """
    return math.exp(mean_nll(llm_or_model, token_ids, ctx, stride, chunk))


def mean_nll(llm_or_model, token_ids: list[int] | torch.Tensor, ctx: int, stride: int | None = None,
             chunk: int = 512) -> float:
    """The mean negative log-likelihood (nats per token) behind `perplexity`."""
    return float(token_nlls(llm_or_model, token_ids, ctx, stride, chunk).double().mean())


def perplexity_ci(nlls: torch.Tensor, block: int = BLOCK) -> tuple[float, float]:
    """The 95% interval of the perplexity of `token_nlls`' scores, resampling stretches of `block` tokens."""
    low, high = block_bootstrap_ci(nlls.tolist(), block)
    return math.exp(low), math.exp(high)  # exp is increasing, so the bounds carry over


@torch.inference_mode()
def token_nlls(llm_or_model, token_ids: list[int] | torch.Tensor, ctx: int, stride: int | None = None,
               chunk: int = 512) -> torch.Tensor:
    """The negative log-likelihood (nats) of every scored token, in text order, as float32 on the CPU."""
    model = llm_or_model if isinstance(llm_or_model, Transformer) else llm_or_model.model
    model.config.check_context(ctx, f"a window of {ctx} tokens")
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    weight = model.model.embed_tokens.weight
    cache = KVCache(model.config, 1, min(ctx, len(ids)), dtype=weight.dtype, device=weight.device)
    slot = torch.zeros(1, dtype=torch.long, device=weight.device)
    nlls = []
    for begin, end, first in windows(len(ids), ctx, stride or max(1, ctx // 2)):
        window = ids[begin:end].to(weight.device)
        # logits at window index r predict token r + 1: the scored rows are [first - 1, end - 1) - begin
        lo, hi = first - 1 - begin, end - 1 - begin
        for a in range(0, len(window), chunk):
            b = min(a + chunk, len(window))
            tokens = window[None, a:b]
            positions = torch.arange(a, b, device=weight.device)[None]
            r0, r1 = max(a, lo), min(b, hi)
            if r0 >= r1:  # context only: fill the cache, skip the (chunk x vocab) logits
                last = torch.tensor([b - a - 1], device=weight.device)
                model(tokens, positions, cache=cache, slots=slot, logits_index=last)
                continue
            rows = model(tokens, positions, cache=cache, slots=slot)[0, r0 - a: r1 - a].float()  # (n, V)
            targets = window[r0 + 1: r1 + 1]
            nlls.append((torch.logsumexp(rows, -1) - rows.gather(-1, targets[:, None])[:, 0]).cpu())
    if not nlls:
        raise OptionError("nothing to score: give at least two tokens")
    return torch.cat(nlls)
