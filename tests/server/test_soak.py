"""Hostile clients beside honest ones, against a real `qwen2 serve` process (the tiny model).

Every valid greedy request must come back equal to its solo twin while the others send bodies
built to hurt: values that overflow sampling, huge stop strings, huge and malformed bodies,
wrong types, NaN, deep nesting, clients that vanish mid-stream, fuzzed fields. Each hostile
request must get a 4xx in OpenAI's error shape; the server's memory stays bounded and it is
healthy at the end.
"""

import http.client
import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import psutil
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server.test_errors import assert_error

HELLO = [{"role": "user", "content": "hi"}]
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
PROMPTS = [f"Soak {i}: {w}" for i, w in enumerate("amber basil cedar dune ember fjord".split())]
GREEDY = {"temperature": 0, "max_tokens": 6, "ignore_eos": True}


def post(server, path: str, body: dict | bytes, timeout: float = 120):
    return server.request("POST", path, body, timeout=timeout)


def completion(server, prompt: str, stream: bool) -> str:
    body = {"prompt": prompt, **GREEDY, "stream": stream}
    r = post(server, COMPLETIONS, body)
    assert r.status == 200, r.text
    if not stream:
        return r.json()["choices"][0]["text"]
    events = [e[6:] for e in r.text.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])


def disconnect_mid_stream(server) -> None:
    url = urlparse(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    body = {"messages": HELLO, "max_tokens": 500, "ignore_eos": True, "stream": True}
    conn.request("POST", CHAT, json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    response.readline()
    conn.sock.close()
    conn.close()


def over_the_cap(server) -> None:
    """Announces a 17 MiB body (the cap is 16) and sends its first bytes: the server answers 413 at once."""
    url = urlparse(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.putrequest("POST", CHAT)
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(17 * 2**20))
    conn.endheaders(b'{"prompt": "' + b"x" * 65536)
    response = conn.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["code"] == "body_too_large"
    conn.close()


def nested(depth: int) -> bytes:
    return b'{"messages": ' + b"[" * depth + b"]" * depth + b"}"


HOSTILE: list[tuple[str, str, dict | bytes, int]] = [
    # the five filed cases (the 7.5 MB body: prepared off the event loop, then too long for the context)
    ("tiny temperature", CHAT, {"messages": HELLO, "temperature": 1e-40}, 400),
    ("tiny repetition penalty", CHAT, {"messages": HELLO, "repetition_penalty": 1e-300}, 400),
    ("40,000-character stop string", CHAT, {"messages": HELLO, "stop": ["x" * 40_000]}, 400),
    ("17 stop strings", COMPLETIONS, {"prompt": "x", "stop": [str(i) for i in range(17)]}, 400),
    ("7.5 MB prompt", CHAT, {"messages": [{"role": "user", "content": "word " * 1_500_000}]}, 400),
    # malformed bodies
    ("not JSON", CHAT, b"{nope", 400),
    ("not UTF-8", CHAT, b'{"messages": [{"role": "user", "content": "\xff\xfe\xc3"}]}', 400),
    ("a JSON array", CHAT, b"[1, 2, 3]", 400),
    ("nested 100,000 deep", CHAT, nested(100_000), 400),
    # wrong types, NaN and infinities
    ("messages a number", CHAT, {"messages": 5}, 400),
    ("max_tokens a string", COMPLETIONS, {"prompt": "x", "max_tokens": "10"}, 400),
    ("NaN temperature", CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400),
    ("infinite top_p", CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}', 400),
    ("NaN logit bias", COMPLETIONS, b'{"prompt": "x", "logit_bias": {"5": NaN}}', 400),
    ("infinite repetition penalty", COMPLETIONS, b'{"prompt": "x", "repetition_penalty": Infinity}', 400),
    # sizes past the bounds
    ("301 logit biases", COMPLETIONS, {"prompt": "x", "logit_bias": {str(i): 1 for i in range(301)}}, 400),
    ("n of 17", CHAT, {"messages": HELLO, "n": 17}, 400),
    ("65 sequences", COMPLETIONS, {"prompt": ["x"] * 17, "n": 4}, 400),
    ("2049 messages", CHAT, {"messages": HELLO * 2049}, 400),
    ("129 tools", CHAT, {"messages": HELLO, "tools": [{"type": "function", "function": {"name": f"f{i}"}}
                                                      for i in range(129)]}, 400),
    ("a 100 KB schema", CHAT, {"messages": HELLO, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "description": "d" * 100_000}}}}, 400),
    ("huge seed", COMPLETIONS, {"prompt": "x", "seed": 10**40, "max_tokens": 2}, 200),  # any integer seeds
]


def mutated(rng: random.Random) -> dict:
    """A valid request with one field set to something odd (the seeded, in-soak fuzzing)."""
    field = rng.choice(["temperature", "top_p", "top_k", "stop", "logit_bias", "n", "seed",
                        "presence_penalty", "min_p", "messages", "logprobs", "top_logprobs", "stream"])
    value = rng.choice([-1, 0, 1e-30, 1e30, -1e30, 2**70, "x", None, [], {}, [None], True, 3.5, [""] * 20])
    return {"messages": HELLO, "max_tokens": 2, field: value}


def test_hostile_clients_never_hurt_honest_ones(tiny_server):
    twins = {p: completion(tiny_server, p, stream=False) for p in PROMPTS}
    assert len(set(twins.values())) > 1
    process = psutil.Process(tiny_server.process.pid)
    rss_before = process.memory_info().rss
    rng = random.Random(1234)
    mismatches, answers, peak = [], [], [rss_before]
    done = threading.Event()

    def honest(i: int) -> None:
        prompt = PROMPTS[i % len(PROMPTS)]
        text = completion(tiny_server, prompt, stream=i % 2 == 0)
        if text != twins[prompt]:
            mismatches.append((prompt, text, twins[prompt]))

    def hostile(case) -> None:
        name, path, body, status = case
        r = post(tiny_server, path, body)
        answers.append((name, r))
        if status != 200:
            assert_error(r, status)
        else:
            assert r.status == 200, (name, r.text)

    def fuzzed(body: dict) -> None:
        r = post(tiny_server, CHAT, body)
        answers.append((json.dumps(body)[:80], r))
        assert r.status == 200 or assert_error(r, r.status) and 400 <= r.status < 500, r.text

    def watch_memory() -> None:
        while not done.wait(0.2):
            peak.append(process.memory_info().rss)

    watcher = threading.Thread(target=watch_memory)
    watcher.start()
    jobs = ([(honest, i) for i in range(24)] + [(hostile, c) for c in HOSTILE] + [(fuzzed, mutated(rng))
                                                                                  for _ in range(30)]
            + [(disconnect_mid_stream, tiny_server)] * 4 + [(over_the_cap, tiny_server)])
    random.Random(5).shuffle(jobs)
    try:
        with ThreadPoolExecutor(12) as pool:
            for future in [pool.submit(f, arg) for f, arg in jobs]:
                future.result()
    finally:
        done.set()
        watcher.join()
    assert not mismatches
    assert all(r.status < 500 for _, r in answers), [(n, r.status, r.text[:200]) for n, r in answers if r.status >= 500]
    # bounded memory: the 7.5 and 9.9 MB bodies pass through, they do not stay
    assert max(peak) - rss_before < 600 * 2**20, (rss_before, max(peak))
    deadline = time.monotonic() + 10
    while (m := tiny_server.metrics())["qwen2_requests_running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert m["qwen2_requests_running"] == 0 and m["qwen2_queue_depth"] == 0 and m["qwen2_engine_up"] == 1
    assert tiny_server.request("GET", "/health").status == 200
    assert not any(k.startswith("qwen2_requests_failed_total") for k in m)  # nobody's generation failed
    assert m['qwen2_requests_rejected_total{reason="body_too_large"}'] >= 1
    assert {p: completion(tiny_server, p, stream=False) for p in PROMPTS} == twins


def test_health_and_running_streams_answer_while_a_huge_request_is_prepared(tiny_server):
    twin = completion(tiny_server, PROMPTS[0], stream=True)
    big = {"messages": [{"role": "user", "content": "lorem ipsum dolor " * 550_000}]}  # 9.9 MB
    answered = {}
    threads = [threading.Thread(target=lambda: answered.setdefault("big", post(tiny_server, CHAT, big))),
               threading.Thread(target=lambda: answered.setdefault("stream", completion(tiny_server, PROMPTS[0],
                                                                                       stream=True)))]
    for t in threads:
        t.start()
    probes = []
    while any(t.is_alive() for t in threads):
        probes.append(tiny_server.request("GET", "/health", timeout=10).status)
    for t in threads:
        t.join()
    error = assert_error(answered["big"], 400, "messages")
    assert error["code"] == "context_length_exceeded"
    assert answered["stream"] == twin
    assert probes and set(probes) == {200}


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=20), st.lists(st.integers(), max_size=3),
                    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3))
# max_tokens stays 2 (wrong types for it are among the cases above): a valid large one is no attack, just slow
FIELDS = ["temperature", "top_p", "top_k", "min_p", "n", "seed", "stop", "logit_bias", "logprobs",
          "top_logprobs", "presence_penalty", "frequency_penalty", "repetition_penalty", "messages", "tools",
          "tool_choice", "response_format", "stream", "ignore_eos"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fields=st.dictionaries(st.sampled_from(FIELDS), SCALARS, min_size=1, max_size=4))
def test_fuzzed_fields_get_an_answer_or_a_4xx_never_a_5xx(tiny_server, fields):
    body = {"messages": HELLO, "max_tokens": 2} | fields
    # json.dumps writes NaN and Infinity as the literals Python's parser (and the server's) accepts
    r = post(tiny_server, CHAT, json.dumps(body).encode())
    if r.status != 200:
        error = assert_error(r, r.status)
        assert 400 <= r.status < 500, (body, error)
