"""The paged KV cache changes where keys live, never what attention computes: a batch read
through random block tables gives the logits of the contiguous cache (itself checked against
transformers in test_model.py), for plain, sliding-window and Dual Chunk Attention layers."""

import dataclasses

import pytest
import torch

from qwen2.model import KVCache, PagedKVCache, Transformer
from tests.conftest import tiny_config

VARIANTS = {
    "plain": {},
    "sliding-window": dict(use_sliding_window=True, sliding_window=7, max_window_layers=1),
    "dca": dict(dual_chunk_attention_config={"chunk_size": 16, "local_size": 4}, max_position_embeddings=16),
}


def model_for(variant: str) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(tiny_config(vocab_size=256), **VARIANTS[variant])).eval()
    model.set_rope(model.config)
    return model


def scatter(cache: PagedKVCache, slots: list[int], lengths: list[int], generator: torch.Generator) -> None:
    """Give each sequence its own blocks, drawn from the whole pool in random order."""
    order = (torch.randperm(cache.blocks - 1, generator=generator) + 1).tolist()
    cache.zero_blocks(list(range(cache.blocks)))
    for slot, n in zip(slots, lengths):
        blocks = [order.pop() for _ in range(-(-n // cache.block_size))]
        cache.tables[slot, :len(blocks)] = torch.tensor(blocks)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("block_size", [4, 16])
def test_paged_cache_gives_the_logits_of_the_contiguous_cache(variant, block_size):
    model = model_for(variant)
    lengths, new = [37, 5, 21], 6  # DCA: 37 + 6 positions span four chunks of 12
    generator = torch.Generator().manual_seed(block_size)
    seqs = torch.randint(0, 256, (3, max(lengths) + new), generator=generator)
    paged = PagedKVCache(model.config, 64, block_size, slots=5, max_len=64)
    slots = torch.tensor([3, 0, 4])  # rows of the block tables, not 0..B-1
    scatter(paged, slots.tolist(), [n + new for n in lengths], generator)
    flat = KVCache(model.config, slots=3, max_len=64)
    T = max(lengths)
    positions = torch.arange(T).expand(3, T)
    with torch.no_grad():
        # one right-padded prefill of all three, as the engine batches prompts
        expected = model(seqs[:, :T], positions, cache=flat)
        got = model(seqs[:, :T], positions, cache=paged, slots=slots)
        for i, n in enumerate(lengths):
            assert (got[i, :n] - expected[i, :n]).abs().max() < 1e-4
        # then decode steps, each sequence at its own position
        for step in range(new):
            pos = torch.tensor(lengths)[:, None] + step
            tokens = seqs.gather(1, pos)
            expected = model(tokens, pos, cache=flat)
            got = model(tokens, pos, cache=paged, slots=slots)
            assert (got - expected).abs().max() < 1e-4


def test_sequences_sharing_a_block_read_the_same_keys():
    model = model_for("plain")
    prefix, tails = torch.randint(0, 256, (1, 8)), torch.randint(0, 256, (2, 3))
    paged = PagedKVCache(model.config, 8, 8, slots=2, max_len=16)
    paged.zero_blocks(list(range(8)))
    paged.tables[0, :2] = torch.tensor([1, 2])
    with torch.no_grad():
        model(prefix, torch.arange(8)[None], cache=paged, slots=torch.tensor([0]))
        paged.tables[1, :2] = torch.tensor([1, 3])  # the second sequence shares block 1: nothing recomputed
        pos = torch.arange(8, 11).expand(2, 3)
        got = model(tails, pos, cache=paged, slots=torch.tensor([0, 1]))
        cold = model(torch.cat([prefix.expand(2, 8), tails], dim=1))[:, 8:]
    assert (got - cold).abs().max() < 1e-4
