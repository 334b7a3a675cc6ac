"""POST /v1/chat/completions and /v1/completions: validate, build the prompt, hand the choices
to the engine, answer whole or as Server-Sent Events ending in `data: [DONE]`.

Building the prompt (chat template, tokenizing, grammar compiling) costs CPU in proportion to
the request's size, so it runs off the event loop (Server.prepare): one huge request never
stalls /health or the streams of others."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from qwen2.engine.sampling import MAX_STOP_STRINGS
from qwen2.errors import RequestError
from qwen2.server import generation
from qwen2.server.generation import Choice
from qwen2.server.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    SamplingFields,
    TokenizeRequest,
    invalid,
)
from qwen2.server.responses import ChatFormat, CompletionFormat, Format, usage
from qwen2.server.structured import tool_call_schema
from qwen2.tools import TOOL_CALL_END, TOOL_CALL_START

if TYPE_CHECKING:
    from qwen2.server.app import Server

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, http: Request) -> Any:
    server: Server = http.app.state.server
    choices, fmt = await server.prepare(prepare_chat, server, body)
    return await respond(server, http, body, choices, fmt)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, http: Request) -> Any:
    server: Server = http.app.state.server
    choices, fmt = await server.prepare(_prepare_completion, server, body)
    return await respond(server, http, body, choices, fmt)


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, http: Request) -> Any:
    """vLLM's /tokenize: a prompt's (or a chat's, through the template) token ids."""
    server: Server = http.app.state.server
    return await server.prepare(_tokenize, server, body)


def _tokenize(server: Server, body: TokenizeRequest) -> dict:
    tokenizer = server.tokenizer
    ids = tokenizer.encode(body.text(lambda messages, opened: server.render(messages, None, opened)))
    strs = [tokenizer.id_to_token(i) for i in ids] if body.return_token_strs else None
    return {"count": len(ids), "max_model_len": server.context, "tokens": ids, "token_strs": strs}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, http: Request) -> Any:
    """vLLM's /detokenize: the text of token ids."""
    server: Server = http.app.state.server
    if not all(0 <= i < server.vocab_size for i in body.tokens):
        raise invalid(f"token ids must be in [0, {server.vocab_size})", "tokens")
    return {"prompt": await server.prepare(server.tokenizer.decode, body.tokens)}


def prepare_chat(server: Server, body: ChatRequest) -> tuple[list[Choice], Format]:
    adapter = server.adapter(body.model)
    tools = body.template_tools()
    forced = body.forced_tool
    # "required" or a named function: open the call ourselves and constrain the rest to a call's JSON
    prefill = TOOL_CALL_START + "\n" if forced is not None else ""
    prompt = server.render([m.to_template() for m in body.messages], tools) + prefill
    ids = server.prompt_ids(prompt, "messages")
    constraint, param = body.constraint(), "structured_outputs"
    if (forced is not None or body.response_format) and constraint:
        raise invalid("structured_outputs cannot be combined with a forced tool_choice or response_format",
                      "structured_outputs")
    if forced is not None:
        constraint, param = ("json", tool_call_schema(tools, forced or None)), "tools"
    elif body.response_format and body.response_format.type == "json_object":
        constraint, param = ("json", {"type": "object"}), "response_format"
    elif body.response_format and body.response_format.type == "json_schema":
        constraint, param = ("json", body.response_format.json_schema.schema_), "response_format"
    choices = [Choice(i, ids, body.sampling_params(len(ids), server.context, i, body.engine_logprobs,
                                                   _processors(server, constraint, param),
                                                   server.tokenizer.sampling_defaults), adapter)
               for i in range(body.n)]
    names = tuple(t["function"]["name"] for t in tools) if tools else ()
    parallel = body.parallel_tool_calls is not False
    for c in choices if names and not parallel else []:  # one call wanted: end the reply after it
        c.params.stop = c.params.stop + [TOOL_CALL_END] if len(c.params.stop) < MAX_STOP_STRINGS else c.params.stop
    return choices, ChatFormat(server.tokenizer, adapter or server.model_name, names, prefill, body.logprobs, parallel)


def _processors(server: Server, constraint: tuple[str, Any] | None, param: str) -> list:
    """The logits processor that enforces a (kind, value) constraint; each choice gets its own (it
    follows that choice's tokens)."""
    if constraint is None:
        return []
    kind, value = constraint
    grammars = server.grammars
    make = {"json": grammars.json, "choice": grammars.choice, "regex": grammars.regex, "grammar": grammars.lark}[kind]
    try:
        return [make(value)]
    except (RequestError, ValueError) as e:  # what llguidance cannot parse or enforce
        raise invalid(str(e), param) from None


FIM_TOKENS = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")  # Qwen2.5-Coder's fill-in-the-middle


def _fill_in_the_middle(server: Server, prompt: str | list[int], suffix: str) -> list[int]:
    """prefix, suffix -> <|fim_prefix|> prefix <|fim_suffix|> suffix <|fim_middle|>: the model writes the middle."""
    ids = [server.tokenizer.token_to_id(t) for t in FIM_TOKENS]
    if None in ids:
        raise invalid("suffix (fill in the middle) needs a model with <|fim_prefix|>, <|fim_suffix|> and "
                      "<|fim_middle|> tokens, such as Qwen2.5-Coder; this model has none", "suffix")
    if not isinstance(prompt, str):
        raise invalid("suffix needs a text prompt, not token ids", "prompt")
    encode = server.tokenizer.encode
    return [ids[0], *encode(prompt), ids[1], *encode(suffix), ids[2]]


def _prepare_completion(server: Server, body: CompletionRequest) -> tuple[list[Choice], Format]:
    adapter, choices, constraint = server.adapter(body.model), [], body.constraint()
    k = body.candidates
    # best_of ranks candidates by their tokens' logprobs, asked for or not
    logprobs = 0 if body.logprobs is None and k > body.n else body.logprobs
    # echo scores the prompt when its logprobs are shown, and with max_tokens 0 (the engine's rule)
    scored = body.echo and (body.logprobs is not None or body.max_tokens == 0)
    prompt_logprobs = (body.logprobs or 0) if scored else None
    for p, prompt in enumerate(body.prompts()):
        if body.suffix is not None:
            prompt = _fill_in_the_middle(server, prompt, body.suffix)
        ids = server.prompt_ids(prompt, "prompt")
        choices += [Choice(p * k + j, ids, body.sampling_params(
            len(ids), server.context, j, logprobs, _processors(server, constraint, "structured_outputs"),
            server.tokenizer.sampling_defaults, prompt_logprobs),
            adapter) for j in range(k)]
    return choices, CompletionFormat(server.tokenizer, adapter or server.model_name, body.logprobs is not None,
                                     body.echo, body.n, k)


async def started(server: Server, choices: list[Choice]) -> AsyncIterator:
    """Start the choices on the engine (a full queue is a 429 here, before any byte) and return their
    merged outputs, timed against the server's timeout and counted for /metrics' TTFT."""
    loop = asyncio.get_running_loop()
    arrived = loop.time()
    await generation.start(server.engine, choices)
    return generation.stream(server.engine, choices, arrived + server.timeout,
                             on_first=lambda: server.metrics.observe_ttft(loop.time() - arrived))


async def respond(server: Server, http: Request, body: SamplingFields, choices: list[Choice], fmt: Format) -> Any:
    events = await started(server, choices)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(sse(server, events, fmt, choices, body.candidates, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    collecting = asyncio.ensure_future(_drain(events))
    try:
        while not (await asyncio.wait({collecting}, timeout=1))[0]:
            if await http.is_disconnected():  # nobody waits for the answer: free the slots now
                collecting.cancel()
                return Response(status_code=499)
        collecting.result()
    except TimeoutError:
        raise timed_out(server) from None
    failed = [c for c in choices if c.finish_reason == "error"]
    if failed:
        raise engine_failed(failed[0].error)
    return fmt.response(choices, usage(choices, body.candidates))


async def sse(server: Server, events: AsyncIterator, fmt: Format, choices: list[Choice], n: int,
              include_usage: bool) -> AsyncIterator[str]:
    """The event stream. When the client disconnects, Starlette cancels this generator at its
    current await; closing `events` then cancels the engine requests (their slots free at once)."""
    extra = {"usage": None} if include_usage else {}
    try:
        async with contextlib.aclosing(events):
            for chunk in fmt.head(choices):
                yield _event(chunk | extra)
            async for choice, out in events:
                if out.finish_reason == "error":
                    yield _event(engine_failed(out.error).body())
                    break
                piece = fmt.piece(choice, out)
                for chunk in ([piece] if piece else []) + (fmt.tail(choice) if out.finish_reason else []):
                    yield _event(chunk | extra)
        if include_usage:
            yield _event(fmt.envelope([], usage=usage(choices, n)))
    except TimeoutError:
        yield _event(timed_out(server).body())
    yield "data: [DONE]\n\n"


async def _drain(events: AsyncIterator) -> None:
    async with contextlib.aclosing(events):
        async for _ in events:
            pass


def engine_failed(reason: str | None) -> APIError:
    return APIError(500, f"{reason or 'generation failed'} (see the server log)", type="server_error",
                    code="generation_failed")


def timed_out(server: Server) -> APIError:
    return APIError(408, f"the request took longer than the server's timeout ({server.timeout:g} s) and was "
                         "cancelled; ask for fewer tokens or raise --timeout", code="timeout")


def _event(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
