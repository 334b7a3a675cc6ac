"""The engine's scheduling is invisible in the tokens: batched, joined mid-flight, prefix-cached
or alone, a request gets the same output. Tiny random model, real tokenizer."""

import pytest
import torch

from qwen2.engine.engine import Engine
from qwen2.engine.sampling import SamplingParams
from qwen2.errors import RequestError
from tests.conftest import tiny_config

PROMPTS = ["def quicksort(arr):", "The capital of France is", "一二三四五六七八九十 and then some more words here",
           "x"]


def run_alone(model, tok, prompt, **params):
    engine = Engine(model, tok, max_concurrency=1, max_seq_len=256)
    request = engine.submit(prompt, SamplingParams(**params))
    list(engine.stream(request))
    return request.output


def drain(engine):
    while engine.has_work:
        engine.step()


def test_batched_greedy_equals_sequential(tiny_model, default_tokenizer):
    engine = Engine(tiny_model, default_tokenizer, max_concurrency=4, max_seq_len=256, prefill_chunk=8)
    requests = [engine.submit(p, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)) for p in PROMPTS]
    drain(engine)
    for p, r in zip(PROMPTS, requests):
        assert r.output == run_alone(tiny_model, default_tokenizer, p, temperature=0, max_tokens=12,
                                     ignore_eos=True)
        assert r.finish_reason == "length"


def test_request_joining_mid_flight_gets_same_tokens(tiny_model, default_tokenizer):
    engine = Engine(tiny_model, default_tokenizer, max_concurrency=2, max_seq_len=256, prefill_chunk=4)
    params = dict(temperature=0, max_tokens=10, ignore_eos=True)
    first = engine.submit(PROMPTS[0], SamplingParams(**params))
    for _ in range(6):
        engine.step()
    late = engine.submit(PROMPTS[2], SamplingParams(**params))
    drain(engine)
    assert first.output == run_alone(tiny_model, default_tokenizer, PROMPTS[0], **params)
    assert late.output == run_alone(tiny_model, default_tokenizer, PROMPTS[2], **params)


def test_more_requests_than_slots_wait_their_turn(tiny_model, default_tokenizer):
    engine = Engine(tiny_model, default_tokenizer, max_concurrency=2, max_seq_len=256)
    params = dict(temperature=0, max_tokens=5, ignore_eos=True)
    requests = [engine.submit(p, SamplingParams(**params)) for p in PROMPTS]
    drain(engine)
    assert [r.output for r in requests] == [run_alone(tiny_model, default_tokenizer, p, **params) for p in PROMPTS]


def test_a_kv_share_sizes_the_cache_by_memory_not_by_sequences(tiny_model, default_tokenizer):
    capped = Engine(tiny_model, default_tokenizer, max_concurrency=1, max_seq_len=256)
    shared = Engine(tiny_model, default_tokenizer, max_concurrency=1, max_seq_len=256, kv_share=0.01)
    assert capped.blocks.usable * capped.cache.block_size <= 256 + capped.cache.block_size  # one sequence's worth
    assert shared.blocks.usable > 100 * capped.blocks.usable  # 1% of the available memory holds far more


def test_prefix_cache_reuses_the_shared_prefix_and_changes_nothing(tiny_model, default_tokenizer):
    engine = Engine(tiny_model, default_tokenizer, max_concurrency=2, max_seq_len=256)
    params = dict(temperature=0, max_tokens=6, ignore_eos=True)
    turn1 = "<|im_start|>user\nhello there, how are you today?<|im_end|>\n<|im_start|>assistant\n"
    first = engine.submit(turn1, SamplingParams(**params))
    list(engine.stream(first))
    turn2 = first.prompt + first.output + default_tokenizer.encode("<|im_end|>\n<|im_start|>user\nand now?")
    second = engine.submit(turn2, SamplingParams(**params))
    list(engine.stream(second))
    assert first.cached_tokens == 0
    assert second.cached_tokens == len(first.prompt) + len(first.output) - 1  # the last token's KV was never computed
    assert second.output == run_alone(tiny_model, default_tokenizer, turn2, **params)


def test_same_seed_same_text_alone_or_in_a_batch(tiny_model, default_tokenizer):
    params = dict(temperature=8.0, top_p=0.95, max_tokens=10, seed=1234, ignore_eos=True)  # hot: tiny model is peaked
    alone = run_alone(tiny_model, default_tokenizer, PROMPTS[1], **params)
    engine = Engine(tiny_model, default_tokenizer, max_concurrency=3, max_seq_len=256)
    others = [engine.submit(p, SamplingParams(temperature=1.0, max_tokens=10, seed=s))
              for p, s in ((PROMPTS[0], 1), (PROMPTS[2], 2))]
    mine = engine.submit(PROMPTS[1], SamplingParams(**params))
    drain(engine)
    assert mine.output == alone
    assert all(o.finish_reason for o in others)
    assert run_alone(tiny_model, default_tokenizer, PROMPTS[1], **(params | {"seed": 99})) != alone


def test_cancel_frees_the_slot_at_once(tiny_model, default_tokenizer):
    engine = Engine(tiny_model, default_tokenizer, max_concurrency=1, max_seq_len=256)
    params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    a = engine.submit(PROMPTS[0], params)
    engine.step()
    engine.step()
    b = engine.submit(PROMPTS[1], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    engine.cancel(a)
    assert a.finish_reason == "cancelled" and not engine.running
    list(engine.stream(b))
    assert len(b.output) == 3


def test_prompt_longer_than_context_is_refused_and_others_continue(tiny_model, default_tokenizer):
    engine = Engine(tiny_model, default_tokenizer, max_concurrency=2, max_seq_len=64)
    ok = engine.submit(PROMPTS[0], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    with pytest.raises(RequestError, match=r"has \d+ tokens but the context holds 64"):
        engine.submit("word " * 100, SamplingParams())
    drain(engine)
    assert len(ok.output) == 4


def test_generation_stops_at_the_end_of_the_context(tiny_model, default_tokenizer):
    engine = Engine(tiny_model, default_tokenizer, max_concurrency=1, max_seq_len=16)
    r = engine.submit(PROMPTS[0], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
    list(engine.stream(r))
    assert r.finish_reason == "length" and len(r.prompt) + len(r.output) == 16


def test_stop_id_ends_the_request(tiny_model, default_tokenizer):
    greedy = run_alone(tiny_model, default_tokenizer, PROMPTS[0], temperature=0, max_tokens=8, ignore_eos=True)
    engine = Engine(tiny_model, default_tokenizer, max_concurrency=1, max_seq_len=256)
    r = engine.submit(PROMPTS[0], SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[greedy[3]]))
    list(engine.stream(r))
    assert r.output == greedy[: greedy.index(greedy[3]) + 1] and r.finish_reason == "stop"


@pytest.mark.parametrize("pieces, stop, shown", [
    (["def f", "(x", "):\n", "    return"], ["x):"], "def f("),  # spans three pieces
    (["a", "b", "c"], ["bd"], "abc"),  # a partial match is released when it fails
    (["hello", " wor", "ld"], ["world", "lo w"], "hel"),  # the earliest stop wins
])
def test_stop_strings_across_token_boundaries(tiny_model, default_tokenizer, pieces, stop, shown):
    engine = Engine(tiny_model, default_tokenizer, max_concurrency=1, max_seq_len=64)
    request = engine.submit("x", SamplingParams(stop=stop))
    text = ""
    for piece in pieces:
        text += engine._release_text(request, piece)
        if request.finish_reason:
            break
    text += request.held_text if not request.finish_reason else ""
    assert text == shown


@pytest.mark.parametrize("kind", ["prompt-lookup", "draft-model"])
def test_speculative_greedy_equals_plain_greedy(tiny_model, default_tokenizer, kind):
    from qwen2.engine.speculative import DraftModel, PromptLookup

    # repetitive text gives the n-gram proposer matches; the draft model is the target itself
    # with one layer removed, so some drafts are accepted and some rejected
    prompt = "a b c d a b c d a b c d a b"
    if kind == "prompt-lookup":
        speculator = PromptLookup(k=4)
    else:
        import copy

        draft = copy.deepcopy(tiny_model)
        del draft.model.layers[1]
        draft.config = tiny_config(num_hidden_layers=1)
        speculator = DraftModel(draft, max_len=256, k=3)
    params = dict(temperature=0, max_tokens=40, ignore_eos=True)
    engine = Engine(tiny_model, default_tokenizer, max_concurrency=1, max_seq_len=256, speculator=speculator)
    request = engine.submit(prompt, SamplingParams(**params))
    list(engine.stream(request))
    assert request.output == run_alone(tiny_model, default_tokenizer, prompt, **params)
    assert request.drafted > 0
    if kind == "prompt-lookup":  # the repetition is found, so forwards were saved
        assert request.accepted > 0


def test_short_prompts_prefill_together_and_match_alone(tiny_model, default_tokenizer):
    engine = Engine(tiny_model, default_tokenizer, max_concurrency=4, max_seq_len=256, prefill_chunk=64)
    params = dict(temperature=0, max_tokens=8, ignore_eos=True)
    requests = [engine.submit(p, SamplingParams(**params)) for p in PROMPTS]
    assert len(engine.step()) == len(PROMPTS)  # one forward prefilled them all: each has its first token
    drain(engine)
    for p, r in zip(PROMPTS, requests):
        assert r.output == run_alone(tiny_model, default_tokenizer, p, **params)


def test_a_batch_of_prompts_comes_back_in_order_equal_to_one_at_a_time(tiny_model, default_tokenizer):
    from qwen2.engine.llm import LLM

    llm = LLM(tiny_model, default_tokenizer, Engine(tiny_model, default_tokenizer, max_concurrency=2, max_seq_len=128))
    prompts = ["def fib(n):", "import os", [9707, 11, 1879], "Hello"]  # texts and token ids, more than the slots
    alone = [llm.generate(p, max_tokens=5, temperature=0) for p in prompts]
    together = llm.generate(prompts, max_tokens=5, temperature=0)
    assert [c.tokens for c in together] == [c.tokens for c in alone]
    assert [c.text for c in together] == [c.text for c in alone]
    chats = llm.chat([[{"role": "user", "content": "hi"}], [{"role": "user", "content": "bye"}]], max_tokens=3,
                     temperature=0)
    assert [c.tokens for c in chats] == [llm.chat([{"role": "user", "content": m}], max_tokens=3,
                                                  temperature=0).tokens for m in ("hi", "bye")]


def test_an_interrupted_batch_leaves_no_request_holding_a_slot(tiny_model, default_tokenizer):
    engine = Engine(tiny_model, default_tokenizer, max_concurrency=2, max_seq_len=128)

    def interrupt(_i: int, _text: str) -> None:
        raise KeyboardInterrupt

    params = SamplingParams(max_tokens=24, temperature=0)
    with pytest.raises(KeyboardInterrupt):
        engine.run_all(["a", "b", "c"], [SamplingParams(max_tokens=1, temperature=0), params, params],
                       on_finish=interrupt)
    assert not engine.has_work


def test_short_prompts_ride_in_the_decode_step_and_get_what_they_get_alone(tiny_model, default_tokenizer, monkeypatch):
    """Prompts arriving while others decode go through the decode step's forward, a row per token (on a model
    with a fused decode step): one weight read for both, and each gets the tokens and logprobs it gets alone."""
    import copy

    from qwen2.quant.blocks import Q8_0, blocks_from_float, kernels_available
    from qwen2.quant.fused_decode import FusedDecode

    if not kernels_available():
        pytest.skip("no compiled kernels here: no fused decode step for prompts to ride in")
    model = blocks_from_float(copy.deepcopy(tiny_model), Q8_0, activations="int8")
    model.decode_step = FusedDecode.for_model(model)
    assert model.decode_step is not None
    first, late = PROMPTS[3], PROMPTS[:2]
    # under 16 rows a forward: the int8 products whatever the batch (from 16, AMX multiplies on bf16 tiles)
    assert 1 + sum(len(default_tokenizer.encode(p)) for p in late) < 16
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=0)

    def scored_alone(prompt):
        engine = Engine(model, default_tokenizer, max_concurrency=1, max_seq_len=256)
        request = engine.submit(prompt, params)
        logprobs = [out.logprob for out in engine.stream(request) if out.token is not None]
        return request.output, logprobs

    engine = Engine(model, default_tokenizer, max_concurrency=3, max_seq_len=256)
    own_forwards = []  # prompt chunks that took a forward of their own
    real = engine._guarded_forward
    monkeypatch.setattr(engine, "_guarded_forward",
                        lambda rs, *a, **k: own_forwards.append(len(rs)) or real(rs, *a, **k))
    requests = [engine.submit(first, params)]
    logprobs = {}

    def step():
        for out in engine.step():
            if out.token is not None:
                logprobs.setdefault(out.request_id, []).append(out.logprob)

    for _ in range(3):
        step()
    requests += [engine.submit(p, params) for p in late]
    while engine.has_work:
        step()
    assert own_forwards == [1]  # the first prompt's, alone; the two late ones rode in a decode step
    for prompt, r in zip([first, *late], requests):
        tokens, alone = scored_alone(prompt)
        assert r.output == tokens, prompt
        torch.testing.assert_close(logprobs[r.id], alone, atol=1e-4, rtol=0)
