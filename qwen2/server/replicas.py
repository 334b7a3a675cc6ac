"""`qwen2 serve --replicas N [--ray ADDRESS]`: N copies of the server behind one endpoint, on Ray Serve.

    client -> Ray Serve's HTTP proxy -> Gateway -> (prefix-affinity router) -> Replica x N

Each Replica holds a whole `qwen2 serve` app (create_app: every route, guard and error shape) and its
own engine; the Gateway reads a request's body, names its prompt for the router, and streams the
chosen replica's answer back untouched. So the replicas speak exactly what one `qwen2 serve` speaks,
streaming included, and the only new code is the forwarding and the routing.

Routing: a request goes to the replica whose prefix cache most likely holds its prompt's start. The
router (one per Gateway process) remembers, per replica, a chain hash of each 64-character block of
the prompts it sent there (vLLM's block hashing, over characters since the router has no tokenizer);
the replica that holds the longest run of a new prompt's leading blocks is tried first, unless its
queue is longer than the shortest by more than `imbalance`; otherwise, and for prompts nobody has
seen, the least loaded replica takes it (Ray Serve probes queue lengths). Two Gateway processes route
independently: each only knows the prompts it sent.

A replica that dies is restarted by Ray Serve. A request it had not begun to answer is sent once
more, to another replica; a stream it was sending is cut short; later requests go to the live ones.
Replica counts follow Ray Serve's autoscaler between --min-replicas and --max-replicas when given.
"""

import asyncio
import hashlib
import json
import logging
import os
import random
from collections import OrderedDict
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import FIFOMixin, RequestRouter

from qwen2.server.app import Settings

log = logging.getLogger(__name__)
BLOCK_CHARS = 64  # ~16 tokens, the engine's prefix-cache block
REMEMBERED_BLOCKS = 1 << 16  # per replica; the oldest are forgotten first
REPLICA_HEADER = "x-qwen2-replica"  # which replica answered: for clients that want to know, and the tests
ATTEMPTS = 2  # a request whose replica dies before answering is sent once more (the router drops the dead one)
PROMPT_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings", "/tokenize")


def prompt_key(path: str, body: bytes) -> str | None:
    """The text whose start decides where a request goes: the model (adapters cache apart), then the
    messages in order or the prompt; None for a request with no prompt (health, models, uploads)."""
    if path not in PROMPT_ROUTES or not body:
        return None
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None  # the replica answers it with the right 400
    if not isinstance(request, dict):
        return None
    parts = [str(request.get("model", ""))]
    messages = request.get("messages")
    if isinstance(messages, list):
        parts += [f"{m.get('role')}\x1f{_text(m.get('content'))}" for m in messages if isinstance(m, dict)]
    else:
        parts.append(_text(request.get("prompt", request.get("input", ""))))
    return "\x1e".join(parts)


def _text(content: Any) -> str:
    if isinstance(content, list):  # content parts, or a batch of prompts: their text in order
        return "".join(_text(part.get("text", "") if isinstance(part, dict) else part) for part in content)
    return "" if content is None else str(content)


def block_hashes(text: str) -> list[bytes]:
    """One hash per whole block of `text`, each covering every block before it too (a chain)."""
    hashes, previous = [], b""
    for start in range(0, len(text) - BLOCK_CHARS + 1, BLOCK_CHARS):
        previous = hashlib.blake2b(previous + text[start:start + BLOCK_CHARS].encode(), digest_size=16).digest()
        hashes.append(previous)
    return hashes


class PrefixMemory:
    """Which prompt blocks were sent to which replica, as an LRU set per replica."""

    def __init__(self, capacity: int = REMEMBERED_BLOCKS):
        self.capacity = capacity
        self.blocks: dict[Any, OrderedDict[bytes, None]] = {}

    def matched(self, replica: Any, hashes: list[bytes]) -> int:
        """How many of the prompt's leading blocks `replica` was sent before."""
        seen = self.blocks.get(replica, {})
        count = 0
        while count < len(hashes) and hashes[count] in seen:
            count += 1
        return count

    def remember(self, replica: Any, hashes: list[bytes]) -> None:
        seen = self.blocks.setdefault(replica, OrderedDict())
        for h in hashes:
            seen[h] = None
            seen.move_to_end(h)
        while len(seen) > self.capacity:
            seen.popitem(last=False)

    def forget(self, replica: Any) -> None:
        self.blocks.pop(replica, None)


class PrefixAffinityRouter(FIFOMixin, RequestRouter):
    """Ray Serve's router for the replicas: longest remembered prefix first, then the least loaded."""

    def initialize_state(self, imbalance: int = 8) -> None:
        self.imbalance, self.memory = imbalance, PrefixMemory()

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        prefix = pending_request.kwargs.get("prefix") if pending_request is not None else None
        hashes = block_hashes(prefix) if prefix else []
        matched = {r.replica_id: self.memory.matched(r.replica_id, hashes) for r in candidate_replicas}
        best = max(matched.values(), default=0)
        # shuffled: Ray Serve takes the first of equally loaded replicas, and idle ones are all equal
        everyone = random.sample(candidate_replicas, len(candidate_replicas))
        if best == 0:
            return [everyone]  # the least loaded of all
        first = [r for r in everyone if matched[r.replica_id] == best]
        rest = [r for r in everyone if matched[r.replica_id] < best]
        if self._overloaded(first, everyone):
            return [everyone]
        return [first, rest] if rest else [first]

    def _overloaded(self, first, everyone) -> bool:
        """Whether the best-matching replicas' queues are longer than the shortest by more than
        `imbalance` (from the queue lengths Ray Serve last saw; unknown counts as balanced)."""
        lengths = {r.replica_id: self._replica_queue_len_cache.get(r.replica_id) for r in everyone}
        known = [n for n in lengths.values() if n is not None]
        ours = [lengths[r.replica_id] for r in first if lengths[r.replica_id] is not None]
        return bool(known and ours) and min(ours) - min(known) > self.imbalance

    def on_request_routed(self, pending_request, replica_id, result) -> None:
        prefix = pending_request.kwargs.get("prefix") if pending_request is not None else None
        if prefix:
            self.memory.remember(replica_id, block_hashes(prefix))

    def on_replica_actor_died(self, replica_id) -> None:
        super().on_replica_actor_died(replica_id)
        self.memory.forget(replica_id)


@dataclass
class Forwarded:
    """An HTTP request as the Gateway received it, for a replica to replay into its app."""
    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    client: tuple[str, int] | None


async def replay(app, request: Forwarded) -> AsyncIterator[dict]:
    """Run one request through an ASGI app in this process; yield the messages it sends as it sends
    them. Stopping early (the client went away) tells the app so and cancels it."""
    sent: asyncio.Queue[dict | None] = asyncio.Queue()
    gone = asyncio.Event()
    body_read = False

    async def receive() -> dict:
        nonlocal body_read
        if not body_read:
            body_read = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def run() -> None:
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": request.method,
                 "scheme": "http", "path": request.path, "raw_path": request.path.encode(), "root_path": "",
                 "query_string": request.query, "headers": request.headers, "client": request.client,
                 "server": None}
        try:
            await app(scope, receive, sent.put)
        finally:
            await sent.put(None)

    task = asyncio.create_task(run())
    try:
        while (message := await sent.get()) is not None:
            yield message
        await task  # an app that failed after its last message
    finally:
        gone.set()
        if not task.done():
            task.cancel()


class Replica:
    """One engine and one whole `qwen2 serve` app, in a Ray Serve replica."""

    def __init__(self, options: dict, settings: Settings, threads: int):
        import torch

        from qwen2.loading import load
        from qwen2.server.app import create_app

        torch.set_num_threads(max(1, threads))
        self.name = f"{os.uname().nodename}:{os.getpid()}"
        with ThreadPoolExecutor(1) as pool:  # a thread that ends, as `qwen2 serve` loads (see its run())
            self.app = create_app(pool.submit(load, **options).result(), settings)

    async def handle(self, request: Forwarded, prefix: str | None = None) -> AsyncIterator[Any]:
        """The app's answer: first {status, headers, replica}, then the body's chunks."""
        async for message in replay(self.app, request):
            if message["type"] == "http.response.start":
                yield {"status": message["status"], "headers": list(message.get("headers", [])),
                       "replica": self.name}
            elif message["type"] == "http.response.body" and message.get("body"):
                yield message["body"]

    def check_health(self) -> None:
        """Ray Serve asks every few seconds; a stopped engine makes it replace this replica."""
        if not self.app.state.server.engine.alive:
            raise RuntimeError("the engine thread has stopped")

    def __del__(self) -> None:  # Ray Serve's hook for a replica being taken down
        if hasattr(self, "app"):
            self.app.state.server.close()


gateway = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)  # every path: see Gateway.forward


def _failure(status: int, message: str, code: str) -> JSONResponse:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}},
                        status_code=status)


@serve.ingress(gateway)
class Gateway:
    """Every path and method, forwarded whole to a replica."""

    def __init__(self, replicas, max_body: int) -> None:
        self.replicas, self.max_body = replicas, max_body

    @gateway.api_route("/{path:path}", methods=["GET", "POST", "HEAD", "OPTIONS", "PUT", "DELETE", "PATCH"])
    async def forward(self, request: Request, path: str):
        body = bytearray()
        async for chunk in request.stream():  # capped here too: the body is held before it moves on
            body += chunk
            if len(body) > self.max_body:
                return _failure(413, f"the request body is over {self.max_body} bytes (--max-body)",
                               "body_too_large")
        client = (request.client.host, request.client.port) if request.client else None
        forwarded = Forwarded(request.method, "/" + path, request.url.query.encode(), list(request.headers.raw),
                              bytes(body), client)
        key = prompt_key(forwarded.path, forwarded.body)
        for attempt in range(ATTEMPTS):
            try:
                stream = self.replicas.options(stream=True).handle.remote(forwarded, prefix=key)
                head = await stream.__anext__()
                break
            except Exception as e:  # the replica died or could not be reached; nothing was sent yet
                log.warning("a replica failed before answering %s (attempt %d): %s", forwarded.path, attempt + 1, e)
        else:
            return _failure(503, "the replicas serving this request stopped; retry shortly", "replica_unavailable")

        async def rest() -> AsyncIterator[bytes]:
            try:
                async for chunk in stream:
                    yield chunk
            except Exception as e:  # mid-stream: the status is sent, so the stream is cut short
                log.warning("a replica failed while answering %s: %s", forwarded.path, e)

        response = StreamingResponse(rest(), status_code=head["status"])
        response.raw_headers = [(k, v) for k, v in head["headers"] if k.lower() != b"content-length"]
        response.raw_headers.append((REPLICA_HEADER.encode(), head["replica"].encode()))
        return response


@dataclass
class ReplicaPlan:
    replicas: int  # started with; the autoscaler moves between the bounds when they are given
    min_replicas: int | None
    max_replicas: int | None
    cpus: float  # per replica
    gpus: float
    max_ongoing: int  # requests one replica holds (running + waiting); more wait at the Gateway


def deploy(options: dict, settings: Settings, plan: ReplicaPlan, host: str, port: int):
    """Start the Gateway and the replicas on the connected Ray cluster; returns the Serve app handle."""
    serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": "WARNING"})
    scaling: dict[str, Any] = {"num_replicas": plan.replicas}
    if plan.min_replicas is not None or plan.max_replicas is not None:
        lower = plan.min_replicas if plan.min_replicas is not None else 1
        upper = plan.max_replicas if plan.max_replicas is not None else max(lower, plan.replicas)
        scaling = {"autoscaling_config": {"min_replicas": lower, "max_replicas": upper,
                                          "initial_replicas": min(max(plan.replicas, lower), upper),
                                          "target_ongoing_requests": max(1, plan.max_ongoing // 2)}}
    replica = serve.deployment(Replica, name="qwen2-replica").options(
        ray_actor_options={"num_cpus": plan.cpus, "num_gpus": plan.gpus}, max_ongoing_requests=plan.max_ongoing,
        request_router_config=RequestRouterConfig(request_router_class=PrefixAffinityRouter),
        health_check_period_s=5, **scaling)

    gateway = serve.deployment(Gateway, name="qwen2-gateway").options(
        ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000)
    threads = max(1, int(plan.cpus))
    return serve.run(gateway.bind(replica.bind(options, settings, threads), settings.max_body), name="qwen2",
                     route_prefix="/")

