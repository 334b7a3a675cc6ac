"""Many sequences share one pool of KV blocks: however many run, however small the pool, whatever
they share, each request gets the tokens it would get alone, and no request is lost or cut.
Tiny random model, real tokenizer."""

import random

import pytest
import torch

from qwen2.engine.engine import Engine
from qwen2.engine.sampling import SamplingParams
from qwen2.errors import OptionError
from tests.conftest import tiny_config

GREEDY = dict(temperature=0, ignore_eos=True)


def kv_bytes(model, tokens: int) -> int:
    config = model.config
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4 * tokens


def drain(engine: Engine) -> list:
    outputs = []
    while engine.has_work:
        outputs += engine.step()
    return outputs


def solo(model, tokenizer, prompts, **params) -> list[list[int]]:
    """Each prompt run alone: one sequence at a time, nothing cached between them."""
    engine = Engine(model, tokenizer, max_concurrency=1, max_seq_len=512)
    outputs = []
    for p in prompts:
        engine.clear_prefix_cache()
        request = engine.submit(p, SamplingParams(**GREEDY, **params))
        drain(engine)
        outputs.append(request.output)
    return outputs


def random_prompts(n: int, seed: int, lo: int = 1, hi: int = 120) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(200, 20000) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def test_64_concurrent_mixed_length_requests_equal_solo_runs(tiny_model, default_tokenizer):
    prompts = random_prompts(64, seed=1, hi=64)
    engine = Engine(tiny_model, default_tokenizer, max_concurrency=64, max_seq_len=512, prefill_chunk=256)
    requests = [engine.submit(p, SamplingParams(**GREEDY, max_tokens=4)) for p in prompts]
    engine.step()
    assert len(engine.running) == 64  # all admitted at once: concurrency is not capped by memory slots
    drain(engine)
    assert [r.output for r in requests] == solo(tiny_model, default_tokenizer, prompts, max_tokens=4)
    assert all(r.finish_reason == "length" for r in requests)


def test_a_preempted_request_resumes_with_the_output_it_would_have_had(tiny_model, default_tokenizer):
    prompts = random_prompts(3, seed=2, lo=5, hi=12)
    # room for one full sequence (64 tokens) only: all three start, but cannot all keep growing
    engine = Engine(tiny_model, default_tokenizer, max_concurrency=3, max_seq_len=64, block_size=16,
                    kv_memory=kv_bytes(tiny_model, 64))
    requests = [engine.submit(p, SamplingParams(**GREEDY, max_tokens=40)) for p in prompts]
    outputs = drain(engine)
    assert sum(r.preemptions for r in requests) > 0
    assert [r.output for r in requests] == solo(tiny_model, default_tokenizer, prompts, max_tokens=40)
    for r in requests:  # every token reached the caller once, in order
        assert [o.token for o in outputs if o.request_id == r.id] == r.output


def test_a_pool_smaller_than_one_sequence_is_refused_with_the_numbers(tiny_model, default_tokenizer):
    with pytest.raises(OptionError, match=r"holds 32 tokens.*less than one sequence of 128 tokens.*--kv-memory"):
        Engine(tiny_model, default_tokenizer, max_seq_len=128, block_size=16, kv_memory=kv_bytes(tiny_model, 40))


def test_a_pool_too_small_for_all_makes_requests_wait_never_fail(tiny_model, default_tokenizer):
    prompts = random_prompts(12, seed=3, lo=10, hi=60)
    engine = Engine(tiny_model, default_tokenizer, max_concurrency=12, max_seq_len=96, block_size=16,
                    kv_memory=kv_bytes(tiny_model, 96))
    requests = [engine.submit(p, SamplingParams(**GREEDY, max_tokens=8)) for p in prompts]
    engine.step()
    assert engine.waiting  # not everyone fits: some wait for blocks
    drain(engine)
    assert all(r.finish_reason == "length" for r in requests)
    assert [r.output for r in requests] == solo(tiny_model, default_tokenizer, prompts, max_tokens=8)


def test_a_shared_prefix_is_computed_once_and_gives_the_logits_of_a_cold_run(tiny_model, default_tokenizer):
    system = random_prompts(1, seed=4, lo=100, hi=100)[0]
    prompts = [system + tail for tail in random_prompts(8, seed=5, lo=3, hi=12)]
    params = SamplingParams(**GREEDY, max_tokens=4, logprobs=5)
    engine = Engine(tiny_model, default_tokenizer, max_concurrency=8, max_seq_len=256, block_size=16)
    computed = []
    for name in ("_forward", "_forward_rows"):  # a prompt's own forward; a decode step's
        forward = getattr(engine, name)
        setattr(engine, name, lambda requests, chunks, starts, _f=forward, **kw: computed.extend(chunks) or _f(
            requests, chunks, starts, **kw))
    requests = [engine.submit(p, params) for p in prompts]
    outputs = drain(engine)
    shared = len(system) // 16 * 16  # full blocks of the system prompt
    assert requests[0].cached_tokens == 0
    assert all(r.cached_tokens >= shared for r in requests[1:])
    prompt_tokens = sum(len(c) for c in computed) - sum(len(r.output) - 1 for r in requests)
    assert prompt_tokens == sum(map(len, prompts)) - 7 * shared  # the system prompt's blocks went through once
    cold = Engine(tiny_model, default_tokenizer, max_concurrency=1, max_seq_len=256, block_size=16)
    for r in requests:
        cold.clear_prefix_cache()
        alone = cold.submit(r.prompt, params)
        cold_out = drain(cold)
        assert alone.output == r.output
        warm = [o.top_logprobs for o in outputs if o.request_id == r.id]
        for a, b in zip(warm, [o.top_logprobs for o in cold_out]):
            assert [t for t, _ in a] == [t for t, _ in b]
            assert max(abs(x - y) for (_, x), (_, y) in zip(a, b)) < 1e-4


def test_a_cached_block_is_never_reused_after_different_preceding_tokens(tiny_model, default_tokenizer):
    engine = Engine(tiny_model, default_tokenizer, max_concurrency=2, max_seq_len=256, block_size=16)
    first, second = random_prompts(2, seed=6, lo=16, hi=16)
    tail = random_prompts(1, seed=7, lo=40, hi=40)[0]  # the same tokens, after different first blocks
    a = engine.submit(first + tail, SamplingParams(**GREEDY, max_tokens=3))
    drain(engine)
    b = engine.submit(second + tail, SamplingParams(**GREEDY, max_tokens=3))
    drain(engine)
    assert a.cached_tokens == 0 and b.cached_tokens == 0
    assert b.output == solo(tiny_model, default_tokenizer, [second + tail], max_tokens=3)[0]
    c = engine.submit(first + tail[:20], SamplingParams(**GREEDY, max_tokens=3))  # a true prefix of a
    drain(engine)
    assert c.cached_tokens == 16 + 20 - 1


def test_cancelled_and_finished_requests_return_their_blocks(tiny_model, default_tokenizer):
    engine = Engine(tiny_model, default_tokenizer, max_concurrency=4, max_seq_len=128, block_size=16,
                    kv_memory=kv_bytes(tiny_model, 256))
    free = engine.blocks.free
    requests = [engine.submit(p, SamplingParams(**GREEDY, max_tokens=50)) for p in random_prompts(4, seed=8)]
    for _ in range(3):
        engine.step()
    assert engine.blocks.free < free
    for r in requests[:3]:
        engine.cancel(r)
    drain(engine)
    assert engine.blocks.free == free and sum(engine.blocks.refs) == 0
    assert not engine.running and sorted(engine.free_slots) == [0, 1, 2, 3]
    assert (engine.cache.tables == 0).all()


def test_sliding_window_and_dca_models_serve_batches_as_alone(default_tokenizer):
    import dataclasses

    from qwen2.model import Transformer

    for changes in (dict(use_sliding_window=True, sliding_window=24, max_window_layers=1),
                    dict(dual_chunk_attention_config={"chunk_size": 32, "local_size": 8})):
        torch.manual_seed(0)
        model = Transformer(dataclasses.replace(tiny_config(), **changes)).eval()
        model.set_rope(model.config)
        prompts = random_prompts(6, seed=9, lo=20, hi=90)  # DCA: past chunk_len = 24, sliding: past the window
        engine = Engine(model, default_tokenizer, max_concurrency=6, max_seq_len=128, block_size=16, prefill_chunk=64)
        requests = [engine.submit(p, SamplingParams(**GREEDY, max_tokens=10)) for p in prompts]
        drain(engine)
        assert [r.output for r in requests] == solo(model, default_tokenizer, prompts, max_tokens=10)
