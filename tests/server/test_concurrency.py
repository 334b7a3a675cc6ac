"""Many clients share the engine's batch; a client that leaves frees its slot at once."""

import asyncio
import http.client
import json
import time
from urllib.parse import urlparse

GREEDY = dict(temperature=0, max_tokens=8, extra_body={"ignore_eos": True})


def test_32_concurrent_streams_equal_their_sequential_twins(tiny_server):
    from openai import AsyncOpenAI

    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    prompts = [f"Request {i}: {words[i % 12]} {words[i // 3 % 12]}" for i in range(32)]

    async def one(client, prompt: str, stream: bool) -> str:
        if not stream:
            r = await client.completions.create(model="tiny", prompt=prompt, **GREEDY)
            return r.choices[0].text
        chunks = await client.completions.create(model="tiny", prompt=prompt, stream=True, **GREEDY)
        return "".join([c.choices[0].text async for c in chunks])

    async def main() -> tuple[list[str], list[str]]:
        async with AsyncOpenAI(base_url=tiny_server.url + "/v1", api_key="x", max_retries=0, timeout=120) as client:
            together = await asyncio.gather(*(one(client, p, stream=True) for p in prompts))
            alone = [await one(client, p, stream=False) for p in prompts]
        return together, alone

    together, alone = asyncio.run(main())
    assert together == alone
    assert len(set(alone)) > 1  # the prompts lead to different replies, so the comparison means something


def test_client_disconnect_frees_the_slot(tiny_server):
    before = tiny_server.metrics()
    url = urlparse(tiny_server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    body = {"messages": [{"role": "user", "content": "go on forever"}], "max_tokens": 2000, "ignore_eos": True,
            "stream": True}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    for _ in range(4):  # the role chunk and a few tokens
        assert response.readline().startswith(b"data: ")
        response.readline()
    assert tiny_server.metrics()["qwen2_requests_running"] == 1
    conn.sock.close()  # the client goes away mid-stream
    conn.close()
    deadline = time.monotonic() + 5
    while (m := tiny_server.metrics())["qwen2_requests_running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert m["qwen2_requests_running"] == 0 and m["qwen2_kv_slots_used"] == 0
    gone = 'qwen2_requests_cancelled_total{reason="client_gone"}'
    assert m[gone] == before.get(gone, 0) + 1
    assert m["qwen2_generation_tokens_total"] - before["qwen2_generation_tokens_total"] < 1000


def test_a_client_that_leaves_before_a_whole_answer_frees_the_slot_too(tiny_server):
    before = tiny_server.metrics()
    url = urlparse(tiny_server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    body = {"prompt": "go on", "max_tokens": 2000, "ignore_eos": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    deadline = time.monotonic() + 10
    while not tiny_server.metrics()["qwen2_requests_running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.5)  # the server has looked for a disconnect at least once before it happens
    conn.sock.close()
    conn.close()
    deadline = time.monotonic() + 5
    while (m := tiny_server.metrics())["qwen2_requests_running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert m["qwen2_requests_running"] == 0
    gone = 'qwen2_requests_cancelled_total{reason="client_gone"}'
    assert m[gone] == before.get(gone, 0) + 1
