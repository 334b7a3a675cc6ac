"""Draft proposers for speculative decoding.

A proposer guesses the next k tokens of a sequence; the engine checks all of them with one
forward of the target model and keeps the longest prefix the target itself would have
produced, so greedy output is unchanged and only the number of target forwards drops.
Used for greedy requests decoding alone (batch 1), where decode is memory-bound and a
(k+1)-token forward costs about as much as a 1-token one.

- PromptLookup: n-gram matching against the sequence itself (no extra model); strong on code
  edits, summaries and anything that copies from its prompt.
- DraftModel: a smaller model of the same tokenizer (e.g. 0.5B drafting for 7B), with a
  one-sequence KV cache of its own; it recomputes only where the sequence differs from the
  one it last drafted for (speculation runs for one request at a time).
"""

from __future__ import annotations

import torch

from qwen2.model import KVCache, Transformer


class PromptLookup:
    def __init__(self, k: int = 4, max_ngram: int = 3):
        self.k, self.max_ngram = k, max_ngram

    def propose(self, tokens: list[int]) -> list[int]:
        """The k tokens that followed the latest earlier occurrence of the sequence's last n-gram."""
        for n in range(min(self.max_ngram, len(tokens) - 1), 0, -1):
            tail = tokens[-n:]
            for start in range(len(tokens) - n - 1, -1, -1):
                if tokens[start:start + n] == tail:
                    return tokens[start + n: start + n + self.k]
        return []


class DraftModel:
    def __init__(self, model: Transformer, max_len: int, k: int = 4):
        self.model, self.k = model, k
        weight = model.model.embed_tokens.weight
        self.cache = KVCache(model.config, 1, max_len, dtype=weight.dtype, device=weight.device)
        self.cached: list[int] = []  # tokens whose KV the cache holds

    @torch.inference_mode()
    def propose(self, tokens: list[int]) -> list[int]:
        """Greedy k tokens from the draft model, reusing what its cache already holds."""
        held = self.cached
        keep = 0
        while keep < min(len(held), len(tokens) - 1) and held[keep] == tokens[keep]:
            keep += 1
        k = min(self.k, self.cache.max_len - len(tokens))
        if k <= 0:
            return []
        device, slots = self.cache.k.device, torch.tensor([0], device=self.cache.k.device)
        new = tokens[keep:]
        logits = self.model(torch.tensor([new], device=device), torch.arange(keep, len(tokens), device=device)[None],
                            cache=self.cache, slots=slots, logits_index=torch.tensor([len(new) - 1], device=device))
        draft = [int(logits[0].argmax())]
        for _ in range(k - 1):
            position = len(tokens) + len(draft) - 1
            logits = self.model(torch.tensor([[draft[-1]]], device=device), torch.tensor([[position]], device=device),
                                cache=self.cache, slots=slots, logits_index=torch.tensor([0], device=device))
            draft.append(int(logits[0].argmax()))
        self.cached = tokens + draft[:-1]
        return draft
