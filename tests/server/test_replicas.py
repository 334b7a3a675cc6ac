"""`qwen2 serve --replicas 2`: two engines behind one endpoint on a local Ray Serve, a real process on loopback.

The replicas serve the same tiny checkpoint with the same flags as the plain `tiny` server, so every
answer can be compared with one `qwen2 serve`'s: the replicas must speak exactly what it speaks.
"""

from __future__ import annotations

import os
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from qwen2.server.replicas import BLOCK_CHARS, REPLICA_HEADER, PrefixMemory, block_hashes, prompt_key
from tests.server.conftest import _launch, _tiny_checkpoint

pytest.importorskip("ray.serve", reason="the `ray` extra is not installed (pip install -e '.[ray]')")

SYSTEM = ("You are a careful assistant. Answer in one short sentence, name no sources, and never use "
          "more words than the question needs. ") * 2  # several blocks, shared by the affinity requests


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, default_tokenizer):
    root = tmp_path_factory.mktemp("replicas")
    model = _tiny_checkpoint(root / "tiny", default_tokenizer)
    server = _launch("replicas", model, ["--ctx", "2048", "--dtype", "float32", "--quant", "none",
                                         "--max-concurrency", "8", "--replicas", "2",
                                         "--min-replicas", "2", "--max-replicas", "3"], root)  # Serve autoscales
    yield server.wait_ready(timeout=300)
    server.process.send_signal(signal.SIGTERM)  # takes its local Ray instance down with it
    try:
        server.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.process.kill()


def chat(server, user: str, max_tokens: int = 8, system: str = SYSTEM):
    return server.request("POST", "/v1/chat/completions", {
        "model": "tiny", "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "max_tokens": max_tokens, "temperature": 0})


def without_ids(answer: dict) -> dict:
    """An answer less what differs between any two servers: ids, times, and how much of the prompt each
    had cached (the plain server has seen other tests' prompts)."""
    answer = {k: v for k, v in answer.items() if k not in ("id", "created")}
    if isinstance(answer.get("usage"), dict):
        answer["usage"] = {k: v for k, v in answer["usage"].items() if k != "prompt_tokens_details"}
    return answer


def test_prompt_key_follows_the_conversation_in_order():
    first = prompt_key("/v1/chat/completions", b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}')
    longer = prompt_key("/v1/chat/completions", b'{"model": "m", "messages": [{"role": "user", "content": "hi"}, '
                                                b'{"role": "assistant", "content": [{"type": "text", "text": "yo"}]}]}')
    assert longer.startswith(first) and longer != first
    assert prompt_key("/v1/completions", b'{"model": "m", "prompt": "def f():"}').endswith("def f():")
    assert prompt_key("/v1/completions", b'{"model": "m", "prompt": "x"}') != prompt_key(
        "/v1/completions", b'{"model": "adapter", "prompt": "x"}')  # adapters cache apart
    unrouted = [("/health", b""), ("/v1/models", b""), ("/v1/completions", b"{bad"), ("/v1/completions", b"[1]")]
    for path, body in unrouted:
        assert prompt_key(path, body) is None


def test_block_hashes_chain_so_a_shared_start_shares_hashes():
    text = "a" * BLOCK_CHARS + "b" * BLOCK_CHARS + "c" * (BLOCK_CHARS - 1)
    hashes = block_hashes(text)
    assert len(hashes) == 2  # only whole blocks
    assert block_hashes(text + "d" * 5)[:2] == hashes
    other = block_hashes("z" + text[1:])
    assert other[0] != hashes[0] and other[1] != hashes[1]  # the second block's hash covers the first


def test_prefix_memory_matches_leading_blocks_and_forgets_the_oldest():
    memory = PrefixMemory(capacity=3)
    a, b = block_hashes("a" * 4 * BLOCK_CHARS), block_hashes("b" * 4 * BLOCK_CHARS)
    memory.remember("r1", a[:2])
    assert memory.matched("r1", a) == 2 and memory.matched("r2", a) == 0 and memory.matched("r1", b) == 0
    memory.remember("r1", b[:2])  # 4 blocks into 3 places: a[0] goes
    assert memory.matched("r1", a) == 0 and memory.matched("r1", b) == 2
    memory.forget("r1")
    assert memory.matched("r1", b) == 0


def test_replicas_answer_every_route_as_one_server_does(replicas, tiny_server):
    for method, path, body in [
        ("POST", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}],
                                          "max_tokens": 6, "temperature": 0}),
        ("POST", "/v1/completions", {"model": "tiny", "prompt": "def fib(n):", "max_tokens": 6, "temperature": 0}),
        ("POST", "/tokenize", {"prompt": "def fib(n):"}),
        ("POST", "/v1/embeddings", {"model": "tiny", "input": "one two"}),
        ("GET", "/v1/models", None),
        ("POST", "/v1/completions", b"{not json"),  # the same 400 in the same shape
        ("POST", "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": -1}),
        ("GET", "/no/such/route", None),
    ]:
        ours, plain = replicas.request(method, path, body), tiny_server.request(method, path, body)
        assert ours.status == plain.status, (path, ours.text)
        assert REPLICA_HEADER in {k.lower() for k in ours.headers}
        if ours.headers.get("content-type", "").startswith("application/json"):
            mine, theirs = ours.json(), plain.json()
            if path == "/v1/models":  # the model is named after its file, and both files are `tiny`
                assert [m["id"] for m in mine["data"]] == [m["id"] for m in theirs["data"]]
            elif path == "/v1/embeddings":  # one thread per replica against two: sums in another order
                assert mine["data"][0]["embedding"] == pytest.approx(theirs["data"][0]["embedding"], abs=1e-5)
            else:
                assert without_ids(mine) == without_ids(theirs), path
    assert replicas.request("GET", "/health").json()["status"] == "ok"


def test_a_document_upload_is_forwarded_whole(replicas, tiny_server):
    import requests

    text = "The lighthouse at Cape Sorrow was built in 1871 by Ada Marsh. " * 40
    for server in (replicas, tiny_server):
        r = requests.post(f"{server.url}/v1/docqa", files={"file": ("notes.md", text.encode(), "text/markdown")},
                          data={"question": "Who built the lighthouse?", "level": "1", "budget": "1024"}, timeout=300)
        assert r.status_code == 200, r.text
        assert r.json()["document_tokens"] > 400
    refused = requests.post(f"{replicas.url}/v1/docqa", files={"file": ("a.jpg", bytes(range(256)) * 4, "image/jpeg")},
                            data={"question": "what is this?"}, timeout=60)
    assert refused.status_code == 400 and "a.jpg: this is a binary file" in refused.json()["error"]["message"]
    assert "qwen2_http_requests_total" in replicas.request("GET", "/metrics").text


def test_concurrent_streaming_and_whole_answers_through_the_openai_client(replicas):
    client = replicas.client()
    prompts = [f"Count to {i}:" for i in range(6)]

    def whole(prompt: str) -> str:
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0).choices[0].text

    def streamed(prompt: str) -> str:
        chunks = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True)
        return "".join(c.choices[0].text for c in chunks)

    with ThreadPoolExecutor(12) as pool:
        wholes = list(pool.map(whole, prompts))
        streams = list(pool.map(streamed, prompts))
    assert wholes == streams and all(wholes)


def test_a_repeated_prefix_goes_to_the_same_replica(replicas):
    answers = [chat(replicas, f"Question {i}: what is {i} plus {i}?") for i in range(4)]
    assert {a.status for a in answers} == {200}
    assert len({a.headers[REPLICA_HEADER] for a in answers}) == 1
    assert all(a.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0 for a in answers[1:])


def test_serving_goes_on_when_a_replica_is_killed(replicas):
    seen: dict[str, str] = {}  # replica -> a system prompt routed there
    for i in range(40):  # prompts nobody has seen go to the least loaded, ties broken at random
        system = f"Prompt family {i}. " + SYSTEM
        answer = chat(replicas, "hello", system=system)
        assert answer.status == 200
        seen.setdefault(answer.headers[REPLICA_HEADER], system)
        if len(seen) == 2:
            break
    assert len(seen) == 2, "every request went to one replica"
    victim, system = next(iter(seen.items()))

    client = replicas.client()
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "system", "content": system}, {"role": "user", "content": "go on"}],
        max_tokens=1500, temperature=0, stream=True, extra_body={"ignore_eos": True})
    first = next(iter(stream))
    assert first.choices[0].delta is not None
    os.kill(int(victim.rsplit(":", 1)[1]), signal.SIGKILL)
    finished = False
    try:
        for chunk in stream:
            finished = finished or any(c.finish_reason for c in chunk.choices)
    except Exception:  # noqa: S110 - a cut stream may also surface as an error in the client
        pass
    assert not finished, "the stream ran to its end on a killed replica"

    later = [chat(replicas, f"after {i}") for i in range(3)]  # the first may have gone to the dead one: resent
    assert [a.status for a in later] == [200, 200, 200], [a.text for a in later]
    assert all(a.headers[REPLICA_HEADER] != victim for a in later)


@pytest.mark.parametrize("argv, phrase", [
    (["--ray", "local"], "give --replicas N too"),
    (["--replicas", "0"], "at least 1"),
    (["--replicas", "2", "--min-replicas", "3", "--max-replicas", "2"], "--min-replicas at most --max-replicas"),
    (["--replicas", "2", "--ray", "local:two"], "a whole number of at least 1"),
    (["--replicas", "2", "--ray", "local:3"], "--replicas says how many copies run"),
])
def test_replica_options_are_checked_before_anything_starts(argv, phrase, capsys):
    from qwen2.cli import main

    with pytest.raises(SystemExit) as exit:
        main(["serve", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code != 0 and len(err) == 1 and phrase in err[0], err
