"""Prompt log-probabilities (SamplingParams.prompt_logprobs): scored chunk by chunk during the
prefill, they equal a teacher-forced forward of the whole prompt, whatever the prefix cache holds."""

import pytest
import torch

from qwen2.engine.engine import Engine
from qwen2.engine.sampling import SamplingParams
from qwen2.errors import RequestError

PROMPT = "def quicksort(arr):\n    if len(arr) <= 1:\n        return arr\n    pivot = arr[len(arr) // 2]\n"


def drain(engine):
    while engine.has_work:
        engine.step()


def direct(model, ids: list[int], n: int) -> list:
    """By hand: log_softmax of one forward over the prompt, read at each next prompt token."""
    with torch.inference_mode():
        logp = model(torch.tensor([ids]))[0].float().log_softmax(-1)
    top = logp.topk(n, dim=-1)
    return [None] + [(float(logp[i, t]), list(zip(top.indices[i].tolist(), top.values[i].tolist())))
                     for i, t in enumerate(ids[1:])]


def assert_close(got: list, want: list) -> None:
    assert len(got) == len(want) and got[0] is None
    for (lp, top), (want_lp, want_top) in zip(got[1:], want[1:]):
        assert lp == pytest.approx(want_lp, abs=1e-4)
        assert [t for t, _ in top] == [t for t, _ in want_top]
        assert [v for _, v in top] == pytest.approx([v for _, v in want_top], abs=1e-4)


def test_prompt_logprobs_equal_a_direct_forward(tiny_model, default_tokenizer):
    ids = default_tokenizer.encode(PROMPT)
    assert len(ids) > 24  # more than one chunk of 8
    engine = Engine(tiny_model, default_tokenizer, max_concurrency=2, max_seq_len=256, prefill_chunk=8)
    scored = engine.submit(ids, SamplingParams(max_tokens=0, prompt_logprobs=3))
    plain = engine.submit("The capital of France is", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    drain(engine)
    assert scored.finish_reason == "length" and scored.output == []
    assert_close(scored.prompt_logprobs, direct(tiny_model, ids, 3))
    # sharing its prefill batches changes nothing for the request beside it
    alone = Engine(tiny_model, default_tokenizer, max_concurrency=1, max_seq_len=256)
    again = alone.submit("The capital of France is", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    drain(alone)
    assert plain.output == again.output


def test_a_cached_prompt_is_scored_in_full_and_its_blocks_serve_others(tiny_model, default_tokenizer):
    ids = default_tokenizer.encode(PROMPT)
    engine = Engine(tiny_model, default_tokenizer, max_concurrency=2, max_seq_len=256)
    first = engine.submit(ids, SamplingParams(temperature=0, max_tokens=2))
    drain(engine)
    assert first.prompt_logprobs == []  # not asked for
    scored = engine.submit(ids, SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=0))
    drain(engine)
    assert scored.cached_tokens == 0 and len(scored.output) == 2
    assert_close(scored.prompt_logprobs, direct(tiny_model, ids, 0))
    assert scored.output == first.output
    engine.clear_prefix_cache()
    engine.submit(ids, SamplingParams(max_tokens=0, prompt_logprobs=0))
    drain(engine)
    later = engine.submit(ids, SamplingParams(temperature=0, max_tokens=2))
    drain(engine)
    assert later.cached_tokens >= engine.cache.block_size and later.output == first.output


def test_a_prompt_preempted_mid_prefill_is_scored_again_from_the_start(tiny_model, default_tokenizer):
    ids = default_tokenizer.encode(PROMPT * 2)[:44]  # three blocks of 16
    config = tiny_model.config  # room for 64 tokens: the decoding request takes the scored one's blocks
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4 * 64
    engine = Engine(tiny_model, default_tokenizer, max_concurrency=2, max_seq_len=64, prefill_chunk=16, kv_memory=kv)
    engine.submit("x y", SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    for _ in range(13):
        engine.step()
    scored = engine.submit(ids, SamplingParams(max_tokens=0, prompt_logprobs=1))
    drain(engine)
    assert scored.preemptions > 0 and scored.finish_reason == "length"
    assert_close(scored.prompt_logprobs, direct(tiny_model, ids, 1))


def test_max_tokens_zero_needs_prompt_logprobs(tiny_model, default_tokenizer):
    engine = Engine(tiny_model, default_tokenizer, max_concurrency=1, max_seq_len=256)
    with pytest.raises(RequestError, match="max_tokens"):
        engine.submit("hi", SamplingParams(max_tokens=0))
    with pytest.raises(RequestError, match="prompt_logprobs"):
        engine.submit("hi", SamplingParams(prompt_logprobs=21))
