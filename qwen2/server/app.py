"""The FastAPI app: one engine shared by every client, the OpenAI routes, health, metrics, the page.

Guards, outermost first: CORS (only with --cors-origin), then one ASGI middleware that counts
requests for /metrics and, before any body is read: answers only the Host names it serves
(loopback names by default, so a web page cannot reach a local server through DNS rebinding),
refuses a browser's cross-origin POST (an Origin that is neither the server's own nor a
--cors-origin: a page on another site may send a form or a body without preflight), checks the
API key on /v1 routes (so a client without the key learns nothing else), wants the body's media
type on routes that take one (415 otherwise: a browser sends text/plain without preflight) and
caps the body size. Every error is answered in OpenAI's shape; a client's mistake is never a 500,
and a 500 never carries a stack trace (it is logged). Every 4xx is counted for /metrics by its
code; /health answers 503 while the engine is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qwen2.agent.documents import Limits
from qwen2.engine.async_engine import AsyncEngine, EngineUnavailableError, QueueFullError
from qwen2.engine.llm import LLM
from qwen2.errors import Qwen2Error, TokenizerError
from qwen2.server.docqa import docqa_router
from qwen2.server.embeddings import router as embeddings_router
from qwen2.server.metrics import Metrics
from qwen2.server.protocol import APIError, invalid
from qwen2.server.responses_api import router as responses_router
from qwen2.server.routes import router
from qwen2.server.structured import Grammars

log = logging.getLogger(__name__)
ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions",
          "/v1/docqa", "/v1/embeddings", "/v1/responses", "/tokenize", "/detokenize")  # metric labels
KEYED = ("/v1/", "/tokenize", "/detokenize")  # the paths --api-key guards (vLLM's tokenizer routes too)
PREPARE_THREADS = 2
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")  # the Host names a loopback-bound server answers to
BODY_TYPES = {"/v1/chat/completions": "application/json", "/v1/completions": "application/json",
              "/tokenize": "application/json", "/detokenize": "application/json",
              "/v1/embeddings": "application/json", "/v1/responses": "application/json",
              "/v1/docqa": "multipart/form-data"}  # the media type each POST route reads
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
T = TypeVar("T")


@dataclass
class Settings:
    model_name: str = "qwen2"
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    max_queue: int = 64  # requests waiting for a slot before new ones get 429
    timeout: float = 600.0  # seconds per request, queueing included
    max_body: int = 8 * 2**20  # bytes
    allowed_hosts: tuple[str, ...] | None = LOOPBACK_HOSTS  # Host header names (optionally :port); None: any
    docqa_concurrency: int = 2  # /v1/docqa requests at once; more get 429
    docqa_timeout: float = 900.0  # seconds per /v1/docqa request, parsing included
    document_limits: Limits = field(default_factory=Limits)  # what parsing one upload may cost
    pooling: str = "last"  # /v1/embeddings: "last" or "mean" token pooling (qwen2.embeddings)


class Server:
    """What the routes share: the engine, the tokenizer, the grammar compiler and the metrics."""

    def __init__(self, llm: LLM, settings: Settings):
        self.settings, self.tokenizer = settings, llm.tokenizer
        self.engine = AsyncEngine(llm.engine, max_waiting=settings.max_queue)
        self.context, self.vocab_size = llm.engine.max_seq_len, llm.config.vocab_size
        self.model_name, self.timeout = settings.model_name, settings.timeout
        self.adapters = llm.engine.adapters.names  # the LoRA adapters a request's `model` may name
        self.grammars = Grammars(llm.tokenizer, self.vocab_size)
        # byte-level BPE spells each token with one character per byte: the longest spelling bounds
        # how many bytes one token covers, so a text over context x that many bytes cannot fit
        self.max_token_bytes = max(len(llm.tokenizer.id_to_token(i) or "") for i in range(self.vocab_size))
        self.metrics = Metrics()
        self.preparing = 0  # requests being prepared or waiting for a preparation thread
        self.docqa_running = 0  # /v1/docqa requests holding a slot (only the event loop changes it)
        self._prepare_pool = ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="qwen2-prepare")

    async def prepare(self, work: Callable[..., T], *args: Any) -> T:
        """Run a request's CPU-heavy preparation off the event loop, at most max_queue at a time."""
        if self.preparing >= max(self.settings.max_queue, PREPARE_THREADS):
            raise QueueFullError(f"{self.preparing} requests are already being prepared; retry shortly")
        self.preparing += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._prepare_pool, work, *args)
        finally:
            self.preparing -= 1

    @contextlib.contextmanager
    def docqa_slot(self) -> Iterator[None]:
        """One of the --docqa-concurrency places for a document question, or a 429."""
        cap = self.settings.docqa_concurrency
        if self.docqa_running >= cap:
            raise APIError(429, f"{self.docqa_running} document questions are being answered, the most this server "
                                f"takes at once (--docqa-concurrency {cap}); retry later", code="docqa_busy",
                           type="rate_limit_error", headers={"Retry-After": "10"})
        self.docqa_running += 1
        try:
            yield
        finally:
            self.docqa_running -= 1

    def close(self) -> None:
        self._prepare_pool.shutdown(wait=False, cancel_futures=True)
        self.engine.shutdown()

    def adapter(self, model: str | None) -> str | None:
        """The LoRA adapter a request's `model` names; None: the base model. Without adapters any
        name runs the base model, as it always has; with them a name must be one served (404)."""
        if model in self.adapters:
            return model
        if model is None or model == self.model_name or not self.adapters:
            return None
        raise self.no_model(model)

    def no_model(self, model: str) -> APIError:
        served = ", ".join(repr(m) for m in [self.model_name, *self.adapters])
        return APIError(404, f"no model {model!r}; this server serves {served}", "model", code="model_not_found")

    def render(self, messages: list[dict], tools: list[dict] | None, opened: bool = True) -> str:
        """The chat as the template writes it; `opened`: ending with the assistant's turn begun."""
        try:
            return self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=opened)
        except TokenizerError as e:
            raise invalid(str(e), "messages") from None

    def prompt_ids(self, prompt: str | list[int], param: str) -> list[int]:
        """The prompt's token ids; runs in a preparation thread (Server.prepare)."""
        if isinstance(prompt, str):
            least = -(-len(prompt.encode(errors="replace")) // self.max_token_bytes)
            if least >= self.context:  # refused without the cost of tokenizing it
                raise self._too_long(f"at least {least}", param)
            ids = self.tokenizer.encode(prompt)  # releases the GIL: the loop and the engine run on
        else:
            ids = prompt
        if not ids:
            raise invalid("the prompt is empty", param)
        if not all(0 <= i < self.vocab_size for i in ids):
            raise invalid(f"token ids must be in [0, {self.vocab_size})", param)
        if len(ids) >= self.context:
            raise self._too_long(str(len(ids)), param)
        return ids

    def _too_long(self, tokens: str, param: str) -> APIError:
        return APIError(400, f"the prompt has {tokens} tokens but the context holds {self.context} (the reply needs "
                             "at least one more); shorten the prompt or restart the server with a larger --ctx", param,
                        code="context_length_exceeded")


def _error(e: APIError, request: Request | None = None) -> JSONResponse:
    if request is not None and 400 <= e.status < 500:
        request.app.state.server.metrics.observe_rejected(e.code or e.type)
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _param(loc: tuple) -> str | None:
    """pydantic's location as OpenAI's param ("messages[0].content"), without union-member tags."""
    parts = [p for p in loc if p != "body" and (isinstance(p, int) or p.replace("_", "").isalpha() and p.islower()
                                                and p not in ("str", "int", "float", "bool", "list", "dict"))]
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".") or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return _error(e, request)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        # of a union's failed branches, the deepest error is the informative one
        worst = max(e.errors(), key=lambda err: len(err.get("loc", ())), default={"msg": "invalid request body"})
        param = _param(tuple(worst.get("loc", ())))
        if param is None:  # the body as a whole: not JSON, or not an object
            return _error(invalid("the request body must be a JSON object, sent with Content-Type: "
                                  f"application/json ({worst['msg']})"), request)
        return _error(invalid(f"{param}: {worst['msg']}", param), request)

    @app.exception_handler(RecursionError)
    async def too_deep(request: Request, _: RecursionError) -> JSONResponse:
        # json.loads of a body nested thousands of levels deep
        return _error(invalid("the request body is nested too deeply"), request)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(e.status_code)
        return _error(APIError(e.status_code, message, code=code, headers=e.headers), request)

    @app.exception_handler(QueueFullError)
    async def queue_full(request: Request, e: QueueFullError) -> JSONResponse:
        return _error(APIError(429, str(e), code="queue_full", type="rate_limit_error", headers={"Retry-After": "1"}),
                      request)

    @app.exception_handler(EngineUnavailableError)
    async def engine_down(_: Request, e: EngineUnavailableError) -> JSONResponse:
        return _error(APIError(503, str(e), code="engine_unavailable", type="server_error"))

    @app.exception_handler(Qwen2Error)
    async def user_error(request: Request, e: Qwen2Error) -> JSONResponse:
        return _error(invalid(str(e)), request)

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error(APIError(500, "internal server error; see the server log", type="server_error"))


class Guard:
    """ASGI middleware: request counts, the API key on /v1 routes, the body size cap."""

    def __init__(self, app: ASGIApp, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        status = 500  # if the app fails before it answers

        async def counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            error = self._refuse(scope)
            if error is not None:
                self.server.metrics.observe_rejected(error.code)
                await JSONResponse(error.body(), error.status, error.headers)(scope, receive, counted)
            else:
                await self.app(scope, self._capped(receive), counted)
        finally:
            self.server.metrics.observe_http(path if path in ROUTES else "other", status)

    def _refuse(self, scope: Scope) -> APIError | None:
        headers = dict(scope["headers"])
        settings = self.server.settings
        host = headers.get(b"host", b"").decode("latin-1")
        if settings.allowed_hosts is not None and not host_allowed(host, settings.allowed_hosts):
            return APIError(403, f"this server does not answer to the Host {host[:100]!r}; if that name is meant to "
                                 "reach it, restart it with --allowed-hosts listing it", code="host_not_allowed")
        origin = headers.get(b"origin")
        if origin is not None and scope["method"] not in SAFE_METHODS:
            origin = origin.decode("latin-1")
            if not origin_allowed(origin, host, settings.cors_origins):
                return APIError(403, f"requests from the web page at {origin[:100]!r} are refused; a page on another "
                                     "site may call this server only if it is started with --cors-origin naming it",
                                code="origin_not_allowed")
        key = settings.api_key
        if key and scope["path"].startswith(KEYED):
            scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
                return APIError(401, "missing or wrong API key; send the header Authorization: Bearer KEY",
                                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        wanted = BODY_TYPES.get(scope["path"])
        if wanted and scope["method"] == "POST":
            media = headers.get(b"content-type", b"").decode("latin-1").partition(";")[0].strip().lower()
            if media != wanted:
                return APIError(415, f"{scope['path']} reads a {wanted} body; send the header Content-Type: {wanted} "
                                     f"(got {media[:100] or 'none'!r})", code="unsupported_media_type")
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.server.settings.max_body:
            return self._too_large()
        return None

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body is larger than the server's limit of {self.server.settings.max_body} "
                             "bytes", code="body_too_large")

    def _capped(self, receive: Receive) -> Receive:
        """A body sent without Content-Length (chunked) is counted as it arrives."""
        seen = 0

        async def capped() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.server.settings.max_body:
                # FastAPI re-raises an HTTPException met while reading the body, and answers it
                raise HTTPException(413, self._too_large().message)
            return message

        return capped


def split_host(value: str) -> tuple[str, str | None]:
    """A Host header (or an --allowed-hosts entry) as (name, port or None), lower-cased."""
    value = value.strip().lower()
    if value.count(":") > 1 and not value.startswith("["):  # a bare IPv6 address, as an option may give it
        return f"[{value}]", None
    name, colon, port = value.rpartition(":")
    if colon and port.isdigit() and not name.endswith(":"):
        return name, port
    return value, None


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    """Whether a Host header names this server: an entry without a port allows every port."""
    if "*" in allowed:
        return True
    name, port = split_host(host)
    for entry in allowed:
        entry_name, entry_port = split_host(entry)
        if name == entry_name and entry_port in (None, port):
            return True
    return False


def origin_allowed(origin: str, host: str, cors_origins: list[str]) -> bool:
    """A browser's Origin is welcome from the server's own pages or a --cors-origin; "null"
    (a sandboxed frame, a file) is not."""
    if origin in cors_origins or "*" in cors_origins:
        return True
    return urlsplit(origin).netloc.lower() == host.strip().lower() != ""


def create_app(llm: LLM, settings: Settings) -> FastAPI:
    server = Server(llm, settings)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        server.close()

    app = FastAPI(title="qwen2", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.server = server
    page = resources.files("qwen2.server").joinpath("page.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page

    @app.get("/health")
    async def health() -> JSONResponse:
        if not server.engine.alive:
            return JSONResponse({"status": "engine down", "model": server.model_name}, status_code=503)
        return JSONResponse({"status": "ok", "model": server.model_name})

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> str:
        return server.metrics.render(server.engine)

    card = {"id": server.model_name, "object": "model", "created": 0, "owned_by": "qwen2",
            "max_model_len": server.context}
    cards = {server.model_name: card} | {name: card | {"id": name, "parent": server.model_name}
                                         for name in server.adapters}  # as vLLM lists LoRA adapters

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": list(cards.values())}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict[str, Any]:
        if model not in cards:
            raise server.no_model(model)
        return cards[model]

    app.include_router(router)
    app.include_router(docqa_router())  # questions over an uploaded document (qwen2.agent)
    app.include_router(embeddings_router)
    app.include_router(responses_router)  # OpenAI's Responses API, onto the chat path
    install_error_handlers(app)
    app.add_middleware(Guard, server=server)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    return app

