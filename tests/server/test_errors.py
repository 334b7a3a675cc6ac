"""Every refusal has its status code and OpenAI's error shape; a client's mistake is never a 500."""

import http.client
import json
import threading
import time
from urllib.parse import urlparse

import pytest

HELLO = [{"role": "user", "content": "hi"}]


def assert_error(r, status: int, param: str | None = "any", fragment: str = "") -> dict:
    assert r.status == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"] and "Traceback" not in error["message"]
    if param != "any":
        assert error["param"] == param
    assert fragment in error["message"]
    return error


@pytest.mark.parametrize("body, param", [
    ({"messages": HELLO, "temperature": "hot"}, "temperature"),
    ({"messages": HELLO, "temperature": 3}, "temperature"),
    ({"messages": HELLO, "max_tokens": 0}, "max_tokens"),
    ({"messages": HELLO, "max_tokens": 1.5}, "max_tokens"),
    ({"messages": HELLO, "n": 0}, "n"),
    ({"messages": HELLO, "top_p": 0}, "top_p"),
    ({"messages": HELLO, "top_logprobs": 50, "logprobs": True}, "top_logprobs"),
    ({"messages": HELLO, "stop": 5}, "stop"),
    ({"messages": HELLO, "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"messages": HELLO, "logit_bias": {"5": 500}}, "logit_bias"),
    ({"messages": HELLO, "logit_bias": {"99999999": 1}}, None),
    ({"messages": HELLO, "logit_bias": {"²": 1}}, "logit_bias"),  # str.isdigit() says yes, int() says no
    ({"messages": HELLO, "logit_bias": {"１５": 1}}, "logit_bias"),  # fullwidth digits: not a token id either
    ({"messages": HELLO, "logit_bias": {"9" * 5000: 1}}, "logit_bias"),  # past int()'s 4,300-digit limit
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0].type"),
    ({"messages": HELLO, "tool_choice": "required"}, "tool_choice"),
    ({"messages": HELLO, "tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ({"messages": HELLO, "response_format": {"type": "json_schema"}}, "response_format"),
    ({"messages": HELLO, "response_format": {"type": "xml"}}, "response_format.type"),
    ({"messages": HELLO, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"not": {"type": "string"}}}}}, "response_format"),
    ({}, "messages"),
])
def test_bad_chat_requests_are_400(tiny_server, body, param):
    assert_error(tiny_server.request("POST", "/v1/chat/completions", body), 400, param)


@pytest.mark.parametrize("body", [
    {"prompt": [151936 + 5]}, {"prompt": []}, {"prompt": ""}, {"prompt": {"a": 1}}, {"prompt": "x", "logprobs": 99},
])
def test_bad_completion_requests_are_400(tiny_server, body):
    assert_error(tiny_server.request("POST", "/v1/completions", body), 400)


def test_malformed_json_is_400(tiny_server):
    for raw in (b"{not json", b"[1, 2]", b""):
        assert_error(tiny_server.request("POST", "/v1/chat/completions", raw), 400)


def test_prompt_longer_than_the_context_is_400_with_both_numbers(tiny_server):
    long = " ".join(["word"] * 3000)
    error = assert_error(tiny_server.request("POST", "/v1/completions", {"prompt": long}), 400, "prompt")
    assert "3000" in error["message"] and "2048" in error["message"]
    assert error["code"] == "context_length_exceeded"
    error = assert_error(tiny_server.request("POST", "/v1/chat/completions",
                                             {"messages": [{"role": "user", "content": long}]}), 400, "messages")
    assert "2048" in error["message"]


def test_unknown_route_is_404_and_wrong_method_405(tiny_server):
    assert_error(tiny_server.request("GET", "/v1/nothing"), 404, None, "/v1/nothing")
    assert_error(tiny_server.request("GET", "/v1/chat/completions"), 405)


def test_api_key(strict_server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": strict_server.api_key}):
        r = strict_server.request("POST", "/v1/chat/completions", {"messages": HELLO, "max_tokens": 1}, headers)
        assert_error(r, 401)
        assert r.headers["www-authenticate"] == "Bearer"
    assert_error(strict_server.request("GET", "/v1/models"), 401)
    assert strict_server.request("GET", "/v1/models", headers=strict_server.auth).status == 200
    assert strict_server.request("GET", "/health").status == 200  # not under /v1
    # the key is checked before the body is read: a keyless malformed body is a 401, not a 400
    assert_error(strict_server.request("POST", "/v1/chat/completions", b"{oops"), 401)
    client = strict_server.client(api_key=strict_server.api_key)
    assert client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=1).choices


def test_body_too_large_is_413(strict_server):
    big = {"messages": [{"role": "user", "content": "x" * 70_000}]}
    assert_error(strict_server.request("POST", "/v1/chat/completions", big, strict_server.auth), 413)
    # sent in chunks without a Content-Length: counted as it arrives
    url = urlparse(strict_server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    chunks = (json.dumps(big).encode()[i:i + 8192] for i in range(0, 80_000, 8192))
    headers = strict_server.auth | {"Content-Type": "application/json"}
    conn.request("POST", "/v1/chat/completions", body=chunks, headers=headers, encode_chunked=True)
    r = conn.getresponse()
    assert r.status == 413 and json.loads(r.read())["error"]["code"] == "body_too_large"


def test_cors_only_for_the_named_origin(strict_server, tiny_server):
    preflight = {"Origin": strict_server.cors_origin, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    r = strict_server.request("OPTIONS", "/v1/chat/completions", headers=preflight)
    assert r.status == 200 and r.headers["access-control-allow-origin"] == strict_server.cors_origin
    r = strict_server.request("GET", "/health", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in {k.lower() for k in r.headers}
    r = tiny_server.request("GET", "/health", headers={"Origin": strict_server.cors_origin})
    assert "access-control-allow-origin" not in {k.lower() for k in r.headers}


def _stream_in_background(server, body: dict) -> tuple[threading.Thread, dict]:
    """Starts a streaming request and reads it to the end in a thread; returns once it has begun."""
    url = urlparse(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps(body | {"stream": True}),
                 server.auth | {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    first = response.readline()  # the role chunk: the request holds a slot or a queue place
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("text", first + response.read()))
    thread.start()
    return thread, result


def test_full_queue_is_429_with_retry_after(strict_server):
    # one slot and a queue of one: the third request is refused until the first two are done
    long = {"messages": HELLO, "max_tokens": 1500, "ignore_eos": True}
    runner, _ = _stream_in_background(strict_server, long)
    waiter, _ = _stream_in_background(strict_server, long)
    r = strict_server.request("POST", "/v1/chat/completions", {"messages": HELLO, "max_tokens": 1}, strict_server.auth)
    assert_error(r, 429)
    assert r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "rate_limit_error"
    runner.join(), waiter.join()


def test_timeout_is_408_or_a_final_error_event(strict_server):
    body = {"messages": HELLO, "max_tokens": 1900, "ignore_eos": True}
    start = time.monotonic()
    assert_error(strict_server.request("POST", "/v1/chat/completions", body, strict_server.auth), 408, None, "timeout")
    assert time.monotonic() - start < strict_server.timeout + 2
    thread, result = _stream_in_background(strict_server, body)
    thread.join()
    events = [e for e in result["text"].decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["error"]["code"] == "timeout"
    # the slot is free again: a small request goes through
    assert strict_server.request("POST", "/v1/chat/completions", {"messages": HELLO, "max_tokens": 1},
                                 strict_server.auth).status == 200
