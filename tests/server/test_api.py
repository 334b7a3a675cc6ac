"""The OpenAI API on the tiny random model, through the official client: shapes and parameters."""

import json

GREEDY = dict(temperature=0, max_tokens=6, extra_body={"ignore_eos": True})
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


def test_health_models_and_page(tiny_server):
    assert tiny_server.request("GET", "/health").json()["status"] == "ok"
    models = tiny_server.client().models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert tiny_server.client().models.retrieve("tiny").id == "tiny"
    assert tiny_server.request("GET", "/v1/models/other").status == 404
    page = tiny_server.request("GET", "/")
    assert page.status == 200 and "text/html" in page.headers["content-type"] and "/v1/chat/completions" in page.text


def test_chat(tiny_server):
    r = tiny_server.client().chat.completions.create(model="tiny", messages=MESSAGES, **GREEDY)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens > 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6


def test_chat_content_parts_and_max_completion_tokens(tiny_server):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}]
    r = tiny_server.client().chat.completions.create(model="tiny", messages=parts, max_completion_tokens=3,
                                                     temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3


def test_streaming_equals_whole_and_reports_usage(tiny_server):
    client = tiny_server.client()
    whole = client.chat.completions.create(model="tiny", messages=MESSAGES, **GREEDY)
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    # the second identical prompt reuses the first one's KV (prefix cache)
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == whole.usage.prompt_tokens - 1


def test_streamed_choices_carry_their_index(tiny_server):
    chunks = list(tiny_server.client().chat.completions.create(model="tiny", messages=MESSAGES, n=2, stream=True,
                                                               **GREEDY))
    texts = {0: "", 1: ""}
    for c in chunks:
        texts[c.choices[0].index] += c.choices[0].delta.content or ""
    assert texts[0] == texts[1] != ""  # greedy: both choices are the same reply
    assert sorted(c.choices[0].index for c in chunks if c.choices[0].finish_reason) == [0, 1]


def test_stream_ends_with_done(tiny_server):
    body = {"messages": MESSAGES, "max_tokens": 2, "stream": True}
    r = tiny_server.request("POST", "/v1/chat/completions", body)
    assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert "usage" not in json.loads(events[0][6:])


def test_completions(tiny_server):
    client = tiny_server.client()
    r = client.completions.create(model="tiny", prompt="def fib(n):", **GREEDY)
    assert r.object == "text_completion" and r.choices[0].text and r.choices[0].finish_reason == "length"
    ids = client.completions.create(model="tiny", prompt=[755, 15801, 1445, 1648], **GREEDY)
    assert ids.usage.prompt_tokens == 4
    many = client.completions.create(model="tiny", prompt=["a b c", "d e f"], n=2, **GREEDY)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text != many.choices[2].text == many.choices[3].text
    streamed = client.completions.create(model="tiny", prompt="def fib(n):", stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text


def test_n_and_seed(tiny_server):
    client = tiny_server.client()
    sampled = dict(model="tiny", messages=MESSAGES, max_tokens=8, temperature=1.0, extra_body={"ignore_eos": True})
    a = client.chat.completions.create(n=2, seed=7, **sampled)
    b = client.chat.completions.create(n=2, seed=7, **sampled)
    c = client.chat.completions.create(n=2, seed=8, **sampled)
    texts = lambda r: [ch.message.content for ch in r.choices]  # noqa: E731
    assert [ch.index for ch in a.choices] == [0, 1] and a.usage.completion_tokens == 16
    assert texts(a) == texts(b) != texts(c)
    assert texts(a)[0] != texts(a)[1]  # choice i is seeded seed + i


def test_logprobs(tiny_server):
    client = tiny_server.client()
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, logprobs=True, top_logprobs=3, **GREEDY)
    entries = r.choices[0].logprobs.content
    assert len(entries) == 6
    for e in entries:  # greedy: the chosen token is the most likely one
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob == e.logprob <= 0
        assert bytes(e.bytes).decode(errors="replace") == e.token
    assert "".join(e.token for e in entries) == r.choices[0].message.content
    c = client.completions.create(model="tiny", prompt="def fib(n):", logprobs=2, **GREEDY)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert lp.text_offset[0] == 0 and all(len(t) == 2 for t in lp.top_logprobs)


def test_stop_strings(tiny_server):
    client = tiny_server.client()
    full = client.completions.create(model="tiny", prompt="x y z", temperature=0, max_tokens=12,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[3:6]
    r = client.completions.create(model="tiny", prompt="x y z", temperature=0, max_tokens=12, stop=[stop, "zzzz"],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[: full.index(stop)]


def test_sampling_extras_and_unknown_fields_are_accepted(tiny_server):
    r = tiny_server.request("POST", "/v1/chat/completions", {
        "messages": MESSAGES, "max_tokens": 3, "top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1,
        "presence_penalty": 0.5, "frequency_penalty": 0.5, "logit_bias": {"15": -100}, "user": "u1",
        "top_p": 0.9, "stop": "\n\n", "some_future_field": {"x": 1}})
    assert r.status == 200, r.text


def test_logit_bias_forces_a_token(tiny_server):
    bang = 0  # "!" in Qwen2's vocabulary
    r = tiny_server.client().completions.create(model="tiny", prompt="hi", temperature=0, max_tokens=3,
                                                logit_bias={str(bang): 100}, extra_body={"ignore_eos": True})
    assert r.choices[0].text == "!!!"


def test_metrics(tiny_server):
    tiny_server.client().completions.create(model="tiny", prompt="hi", max_tokens=2)
    text = tiny_server.request("GET", "/metrics").text
    for name in ("qwen2_http_requests_total{", "qwen2_prompt_tokens_total", "qwen2_generation_tokens_total",
                 "qwen2_queue_depth", "qwen2_requests_running", "qwen2_kv_slots_used", "qwen2_kv_slots_total 8",
                 'qwen2_time_to_first_token_seconds_bucket{le="+Inf"}', "qwen2_time_to_first_token_seconds_count"):
        assert name in text
    m = tiny_server.metrics()
    assert m["qwen2_generation_tokens_total"] >= 2 and m["qwen2_time_to_first_token_seconds_count"] >= 1
    # nothing runs now: the finished request's blocks are idle (cached for reuse, yet free to take)
    assert m["qwen2_kv_blocks_used"] == 0 < m["qwen2_kv_blocks_total"]
