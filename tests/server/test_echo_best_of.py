"""/v1/completions' echo and best_of through the official client, on the tiny random model served
exact (float32): echoed prompt log-probabilities equal a teacher-forced forward, best_of keeps the
candidates whose sampled tokens are most likely. lm-evaluation-harness's local-completions model
scores continuations through echo as it would against vLLM."""

import openai
import pytest
import torch

from qwen2.loading import load_model

TEXT = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n"
GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def tiny(tiny_server):
    return load_model(tiny_server.model, dtype="float32", quant="none")


def forward_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of one forward over the whole prompt (T, V): row i scores token i + 1."""
    with torch.inference_mode():
        return model(torch.tensor([ids]))[0].float().log_softmax(-1)


def test_echo_logprobs_equal_a_teacher_forced_forward(tiny_server, tiny):
    model, tokenizer = tiny
    ids = tokenizer.encode(TEXT)
    r = tiny_server.client().completions.create(model="tiny", prompt=TEXT, echo=True, max_tokens=0, logprobs=3)
    choice, lp = r.choices[0], r.choices[0].logprobs
    assert choice.text == TEXT and choice.finish_reason == "length"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 0
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
    assert "".join(lp.tokens) == TEXT and all(TEXT.startswith(t, o) for t, o in zip(lp.tokens, lp.text_offset))
    logp = forward_logprobs(model, ids)
    want = [float(logp[i, t]) for i, t in enumerate(ids[1:])]
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    for i, top in enumerate(lp.top_logprobs[1:]):
        values, best = logp[i].topk(3)
        assert sorted(top.values(), reverse=True) == pytest.approx(values.tolist(), abs=1e-4)
        assert set(top) == {tokenizer.decode([t]) for t in best.tolist()}


def test_echo_with_generated_tokens_and_without_logprobs(tiny_server):
    client = tiny_server.client()
    plain = client.completions.create(model="tiny", prompt=TEXT, max_tokens=5, logprobs=1, **GREEDY)
    echoed = client.completions.create(model="tiny", prompt=TEXT, max_tokens=5, logprobs=1, echo=True, **GREEDY)
    scored = client.completions.create(model="tiny", prompt=TEXT, max_tokens=0, logprobs=1, echo=True)
    lp, gen = echoed.choices[0].logprobs, plain.choices[0].logprobs
    assert echoed.choices[0].text == TEXT + plain.choices[0].text
    assert lp.tokens == scored.choices[0].logprobs.tokens + gen.tokens
    assert lp.token_logprobs == pytest.approx(scored.choices[0].logprobs.token_logprobs + gen.token_logprobs, abs=1e-4)
    assert lp.text_offset[-5:] == [len(TEXT) + o for o in gen.text_offset]
    assert echoed.usage.completion_tokens == 5
    bare = client.completions.create(model="tiny", prompt=TEXT, max_tokens=5, echo=True, **GREEDY)
    assert bare.choices[0].text == echoed.choices[0].text and bare.choices[0].logprobs is None
    only = client.completions.create(model="tiny", prompt=TEXT, max_tokens=0, echo=True)
    assert only.choices[0].text == TEXT and only.choices[0].logprobs is None


def test_token_id_prompts_echo_their_text(tiny_server, tiny):
    _, tokenizer = tiny
    client = tiny_server.client()
    texts = [TEXT, "The capital of France is"]
    by_text = client.completions.create(model="tiny", prompt=texts, echo=True, max_tokens=0, logprobs=0)
    by_ids = client.completions.create(model="tiny", prompt=[tokenizer.encode(t) for t in texts], echo=True,
                                       max_tokens=0, logprobs=0)
    assert [c.text for c in by_ids.choices] == texts
    for a, b in zip(by_text.choices, by_ids.choices):
        # The two prompts may share a prefill batch in one request and not in the other: sums differ in the last bits.
        assert a.logprobs.tokens == b.logprobs.tokens
        assert a.logprobs.token_logprobs[0] is b.logprobs.token_logprobs[0] is None
        assert a.logprobs.token_logprobs[1:] == pytest.approx(b.logprobs.token_logprobs[1:], abs=1e-4)
        assert all(top == {} for top in b.logprobs.top_logprobs[1:])  # logprobs 0: no alternatives


def test_streamed_echo_sends_the_prompt_first(tiny_server):
    client = tiny_server.client()
    whole = client.completions.create(model="tiny", prompt=TEXT, max_tokens=4, logprobs=1, echo=True, **GREEDY)
    chunks = [c for c in client.completions.create(model="tiny", prompt=TEXT, max_tokens=4, logprobs=1, echo=True,
                                                   stream=True, **GREEDY) if c.choices]
    assert chunks[0].choices[0].text.startswith(TEXT)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    streamed_logprobs = sum((s.token_logprobs for s in streamed), [])
    assert streamed_logprobs[1:] == pytest.approx(whole.choices[0].logprobs.token_logprobs[1:], abs=1e-4)
    assert sum((s.text_offset for s in streamed), []) == whole.choices[0].logprobs.text_offset
    only = [c for c in client.completions.create(model="tiny", prompt=TEXT, max_tokens=0, echo=True, stream=True)]
    assert [c.choices[0].text for c in only] == [TEXT, ""] and only[-1].choices[0].finish_reason == "length"


def _score(choice) -> float:
    return sum(choice.logprobs.token_logprobs)


def test_best_of_returns_the_most_likely_candidates(tiny_server):
    client = tiny_server.client()
    sampled = dict(model="tiny", prompt="Once upon a time", max_tokens=4, temperature=1.0, top_p=1.0, seed=11,
                   extra_body={"ignore_eos": True})
    # candidate j is seeded seed + j, as choice j of n is: n=best_of shows every candidate
    every = client.completions.create(n=4, logprobs=0, **sampled)
    ranked = sorted(every.choices, key=_score, reverse=True)
    assert len({c.text for c in every.choices}) > 1
    best = client.completions.create(best_of=4, logprobs=0, **sampled)
    assert [c.index for c in best.choices] == [0] and best.choices[0].text == ranked[0].text
    assert _score(best.choices[0]) >= max(map(_score, every.choices)) - 1e-4
    assert best.usage.completion_tokens == 16 and best.usage.prompt_tokens == every.usage.prompt_tokens
    two = client.completions.create(n=2, best_of=4, **sampled)  # ranked by logprobs that are not shown
    assert [c.text for c in two.choices] == [c.text for c in ranked[:2]] and two.choices[0].logprobs is None
    prompts = client.completions.create(**sampled | {"prompt": ["Once upon a time", "x"]}, best_of=4)
    assert [c.index for c in prompts.choices] == [0, 1] and prompts.choices[0].text == ranked[0].text
    assert prompts.usage.completion_tokens == 32


@pytest.mark.parametrize("body, param", [
    ({"n": 3, "best_of": 2}, "best_of"),
    ({"best_of": 2, "stream": True}, "best_of"),
    ({"best_of": 17}, None),
    ({"max_tokens": 0}, "max_tokens"),
    ({"echo": True, "suffix": "x"}, "echo"),
    ({"prompt": ["a"] * 5, "best_of": 16}, "prompt"),
])
def test_bad_combinations_are_400s_naming_the_field(tiny_server, body, param):
    r = tiny_server.request("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2} | body)
    assert r.status == 400, r.text
    if param:
        assert r.json()["error"]["param"] == param
    with pytest.raises(openai.BadRequestError):
        tiny_server.client().completions.create(model="tiny", **{"prompt": "hi", "max_tokens": 2} | body)


def test_lm_eval_local_completions_scores_like_a_forward(tiny_server, tiny):
    """lm-evaluation-harness 0.4's OpenAI-compatible model (echo, max_tokens 1, logprobs 1), offline:
    the tokenizer from the checkpoint's folder, text requests."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    model, tokenizer = tiny
    lm = LocalCompletionsAPI(base_url=tiny_server.url + "/v1/completions", model="tiny",
                             tokenizer_backend="huggingface", tokenizer=str(tiny_server.model),
                             tokenized_requests=False, max_retries=1)
    pairs = [("The capital of France is", " Paris"), ("def add(a, b):", "\n    return a + b")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    got = lm.loglikelihood(requests)
    for (context, continuation), (score, _) in zip(pairs, got):
        # the harness's split: the context's tokens, then the rest of the whole text's ("):\n" becomes "):")
        ctx = tokenizer.encode(context)
        cont = tokenizer.encode(context + continuation)[len(ctx):]
        logp = forward_logprobs(model, ctx + cont)
        want = sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
        assert score == pytest.approx(want, abs=1e-3)
