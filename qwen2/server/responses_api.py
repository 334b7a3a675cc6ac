"""POST /v1/responses: the part of OpenAI's Responses API a chat turn uses, translated onto the chat
path. The request becomes a ChatRequest (so the prompt, tool calling and sampling are exactly
/v1/chat/completions'), and the chat answer, whole or chunk by chunk, becomes a `response` object
or its stream of events (`event: TYPE` / `data: {..., "sequence_number": n}`, no [DONE]).

Served: `input` (a text, or items: messages with text content, function_call and
function_call_output), `instructions` (a system message first), function `tools`, `tool_choice`,
`parallel_tool_calls`, `temperature`, `top_p`, `max_output_tokens` (a reply cut there is
"incomplete"), `stream`, `text.format` (text, json_object, json_schema: the reply constrained as
response_format constrains a chat's). Ignored: store (nothing is stored), metadata, user and the
other bookkeeping fields. Refused with a 400 naming the field: image, file and audio content,
items other than those above, built-in tools (web_search, file_search, ...), previous_response_id,
conversation, prompt, reasoning, include, background, top_logprobs, and truncation "auto".
"""

from __future__ import annotations

import contextlib
import copy
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field, ValidationError

from qwen2.server.generation import Choice
from qwen2.server.protocol import APIError, Body, ChatRequest, invalid
from qwen2.server.responses import Format, usage
from qwen2.server.routes import engine_failed, prepare_chat, respond, started, timed_out

if TYPE_CHECKING:
    from qwen2.server.app import Server

MAX_ITEMS = 2048  # as many as a chat's messages
UNSUPPORTED = {  # refused when given, never silently dropped: each changes what the answer means
    "previous_response_id": "it stores no responses; send the whole conversation in input",
    "conversation": "it stores no conversations; send the whole conversation in input",
    "prompt": "it stores no prompt templates; send the text in instructions and input",
    "reasoning": "its models do not reason",
    "include": "it adds nothing to a response on request",
    "background": "it answers within the request",
    "top_logprobs": "/v1/chat/completions returns log probabilities",
}

router = APIRouter()


class TextFormat(Body):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    def response_format(self) -> dict[str, Any] | None:
        """The chat request's response_format: the reply constrained to JSON (qwen2.server.structured)."""
        if self.type == "json_schema" and self.schema_ is None:
            raise invalid("text.format of type json_schema needs a schema", "text.format.schema")
        if self.type == "json_schema":
            return {"type": "json_schema", "json_schema": self.model_dump(exclude={"type"}, by_alias=True)}
        return {"type": self.type} if self.type == "json_object" else None


class TextConfig(Body):
    format: TextFormat | None = None


class MessageItem(Body):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[dict[str, Any]]


class FunctionCallItem(Body):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(Body):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[dict[str, Any]]


class FunctionTool(Body):
    type: Literal["function"]
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ResponsesRequest(Body):
    model: str | None = None
    # items are read one by one (chat_messages), so that an unsupported kind is named as such
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_output_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    text: TextConfig | None = None
    truncation: Literal["disabled"] | None = None
    previous_response_id: Any = None  # UNSUPPORTED
    conversation: Any = None
    prompt: Any = None
    reasoning: Any = None
    include: Any = None
    background: Any = None
    top_logprobs: Any = None

    @property
    def format(self) -> TextFormat:
        return self.text.format if self.text and self.text.format else TextFormat(type="text")

    def to_chat(self) -> ChatRequest:
        """The same turn as a chat completion request."""
        for name, why in UNSUPPORTED.items():
            if getattr(self, name):
                raise invalid(f"{name} is not supported by this server: {why}", name)
        for i, t in enumerate(self.tools or []):
            if t.get("type") != "function":
                raise invalid(f"tools[{i}]: {t.get('type')!r} tools are not supported; this server calls only "
                              "function tools (the client runs them)", f"tools[{i}]")
        tools = [_read(FunctionTool, t, f"tools[{i}]") for i, t in enumerate(self.tools or [])]
        chat: dict[str, Any] = {
            "messages": chat_messages(self.instructions, self.input),
            "tools": [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                      for t in tools] or None,
            "tool_choice": _tool_choice(self.tool_choice), "parallel_tool_calls": self.parallel_tool_calls,
            "temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_output_tokens,
            "response_format": self.format.response_format()}
        try:
            return ChatRequest.model_validate(chat)
        except ValidationError as e:  # what the item checks above let through
            raise invalid(f"input: {e.errors()[0]['msg']}", "input") from None


def _read(model: type[BaseModel], data: Any, param: str) -> Any:
    """`data` as `model`, or a 400 naming the field at fault."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        error = e.errors()[0]
        where = param + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"])
        raise invalid(f"{where}: {error['msg']}", where) from None


def _tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if not isinstance(choice, dict):
        return choice
    if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
        raise invalid(f"tool_choice of type {choice.get('type')!r} is not supported; give \"none\", \"auto\", "
                      "\"required\" or {\"type\": \"function\", \"name\": ...}", "tool_choice")
    return {"type": "function", "function": {"name": choice["name"]}}


def _text(content: str | list[dict[str, Any]], param: str) -> str:
    """A message's content as text: its input_text / output_text parts joined."""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.get("type") not in ("input_text", "output_text") or not isinstance(part.get("text"), str):
            raise invalid(f"{param}[{j}]: {part.get('type')!r} content is not supported; this server reads text "
                          "(input_text or output_text parts with a text)", f"{param}[{j}]")
        texts.append(part["text"])
    return "\n".join(texts)


def chat_messages(instructions: str | None, input: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chat messages of a Responses input: function calls join the assistant message before
    them (one turn), each function_call_output is a tool message."""
    items = [{"role": "user", "content": input}] if isinstance(input, str) else input
    if not items:
        raise invalid("input is empty", "input")
    if len(items) > MAX_ITEMS:
        raise invalid(f"input has {len(items)} items, more than {MAX_ITEMS}", "input")
    messages = [{"role": "system", "content": instructions}] if instructions else []
    for i, item in enumerate(items):
        kind, param = item.get("type", "message"), f"input[{i}]"
        if kind == "message":
            m = _read(MessageItem, item, param)
            messages.append({"role": m.role, "content": _text(m.content, f"{param}.content")})
        elif kind == "function_call":
            c = _read(FunctionCallItem, item, param)
            call = {"id": c.call_id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            if not messages or messages[-1]["role"] != "assistant":
                messages.append({"role": "assistant", "content": None})
            messages[-1].setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            o = _read(FunctionCallOutputItem, item, param)
            messages.append({"role": "tool", "tool_call_id": o.call_id, "content": _text(o.output, f"{param}.output")})
        else:
            raise invalid(f"{param}: items of type {kind!r} are not supported; this server takes message, "
                          "function_call and function_call_output items", param)
    return messages


def _prepare(server: Server, body: ResponsesRequest) -> tuple[ChatRequest, list[Choice], Format]:
    chat = body.to_chat()
    return chat, *prepare_chat(server, chat)


@router.post("/v1/responses")
async def create_response(body: ResponsesRequest, http: Request) -> Any:
    server: Server = http.app.state.server
    chat, choices, fmt = await server.prepare(_prepare, server, body)
    out = Builder(body, server.model_name)
    if not body.stream:
        done = await respond(server, http, chat, choices, fmt)
        if not isinstance(done, dict):  # the client left
            return done
        choice = done["choices"][0]
        out.text(choice["message"]["content"] or "")
        for k, call in enumerate(choice["message"].get("tool_calls") or []):
            out.call(k, call["id"], call["function"]["name"], call["function"]["arguments"])
        out.finish(choices[0].finish_reason, done["usage"])
        return out.response
    events = await started(server, choices)
    return StreamingResponse(_sse(server, events, fmt, choices, out), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def _sse(server: Server, events: AsyncIterator, fmt: Format, choices: list[Choice],
               out: Builder) -> AsyncIterator[str]:
    """The chat chunks of the one choice, as Responses events. A client that leaves cancels this
    generator; closing `events` then cancels the engine request (routes.sse)."""
    try:
        async with contextlib.aclosing(events):
            yield from_events(out.start())
            fmt.head(choices)  # readies the tool-call parser; its opening chunk has nothing to translate
            async for choice, step in events:
                if step.finish_reason == "error":
                    yield from_events([out.error(engine_failed(step.error))])
                    return
                piece = fmt.piece(choice, step)
                for chunk in ([piece] if piece else []) + (fmt.tail(choice) if step.finish_reason else []):
                    yield from_events(out.chunk(chunk["choices"][0]["delta"]))
        yield from_events(out.finish(choices[0].finish_reason, usage(choices, 1)))
    except TimeoutError:
        yield from_events([out.error(timed_out(server))])


def from_events(events: list[dict]) -> str:
    return "".join(f"event: {e['type']}\ndata: {json.dumps(e, ensure_ascii=False)}\n\n" for e in events)


class Builder:
    """A response's output items, built from the chat answer's text and tool calls, with the
    events that announce each change (a stream sends them, a whole answer only the result).
    Text goes into a message item; a function call closes it, and text after a call opens another."""

    def __init__(self, body: ResponsesRequest, model: str):
        self.body, self.model = body, model
        self.id, self.created = f"resp_{secrets.token_hex(12)}", int(time.time())
        self.output: list[dict] = []
        self.message: dict | None = None  # the message item being written
        self.calls: dict[int, dict] = {}  # the chat's tool-call index -> its function_call item
        self.sequence = 0
        self.response = self._response("in_progress")

    def _event(self, type: str, **fields: Any) -> dict:
        """A snapshot: the items it shows go on changing."""
        self.sequence += 1
        return {"type": type, "sequence_number": self.sequence - 1, **copy.deepcopy(fields)}

    def _response(self, status: str, usage: dict | None = None, incomplete: dict | None = None) -> dict:
        b = self.body
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "model": self.model, "output": self.output, "usage": usage, "error": None,
                "incomplete_details": incomplete, "instructions": b.instructions, "tools": b.tools or [],
                "tool_choice": b.tool_choice or "auto", "parallel_tool_calls": b.parallel_tool_calls is not False,
                "temperature": b.temperature, "top_p": b.top_p, "max_output_tokens": b.max_output_tokens,
                "text": {"format": b.format.model_dump(by_alias=True, exclude_none=True)}, "metadata": {}}

    def start(self) -> list[dict]:
        return [self._event("response.created", response=self.response),
                self._event("response.in_progress", response=self.response)]

    def chunk(self, delta: dict) -> list[dict]:
        """A chat chunk's delta: content, and tool_calls entries (one with an id begins a call)."""
        events = self.text(delta.get("content") or "")
        for entry in delta.get("tool_calls") or []:
            function = entry.get("function", {})
            if entry.get("id"):
                events += self.call(entry["index"], entry["id"], function["name"], function.get("arguments", ""))
            else:
                events += self._arguments(self.calls[entry["index"]], function.get("arguments", ""))
        return events

    def text(self, delta: str) -> list[dict]:
        if not delta:
            return []
        events = []
        if self.message is None:
            self.message = {"id": f"msg_{secrets.token_hex(12)}", "type": "message", "role": "assistant",
                            "status": "in_progress", "content": []}
            events.append(self._added(self.message))
            self.message["content"].append({"type": "output_text", "text": "", "annotations": []})
            events.append(self._event("response.content_part.added", **self._where(self.message), content_index=0,
                                      part=self.message["content"][0]))
        self.message["content"][0]["text"] += delta
        return events + [self._event("response.output_text.delta", **self._where(self.message), content_index=0,
                                     delta=delta, logprobs=[])]

    def call(self, index: int, call_id: str, name: str, arguments: str) -> list[dict]:
        events = self._close_message("completed")
        item = {"id": f"fc_{secrets.token_hex(12)}", "type": "function_call", "status": "in_progress",
                "call_id": call_id, "name": name, "arguments": ""}
        self.calls[index] = item
        return events + [self._added(item)] + self._arguments(item, arguments)

    def _arguments(self, item: dict, delta: str) -> list[dict]:
        if not delta:
            return []
        item["arguments"] += delta
        return [self._event("response.function_call_arguments.delta", **self._where(item), delta=delta)]

    def finish(self, finish_reason: str | None, chat_usage: dict) -> list[dict]:
        """Close every item; the response is "incomplete" when the reply hit max_output_tokens
        (`finish_reason`: the engine's, "length" even where the chat's says "tool_calls")."""
        cut = finish_reason == "length"
        events = self._close_message("incomplete" if cut else "completed")
        for item in self.calls.values():
            item["status"] = "incomplete" if cut else "completed"
            events += [self._event("response.function_call_arguments.done", **self._where(item),
                                   name=item["name"], arguments=item["arguments"]),
                       self._event("response.output_item.done", output_index=self.output.index(item), item=item)]
        tokens = {"input_tokens": chat_usage["prompt_tokens"],
                  "input_tokens_details": {"cached_tokens": chat_usage["prompt_tokens_details"]["cached_tokens"]},
                  "output_tokens": chat_usage["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
                  "total_tokens": chat_usage["total_tokens"]}
        self.response = self._response("incomplete" if cut else "completed", tokens,
                                       {"reason": "max_output_tokens"} if cut else None)
        return events + [self._event("response.incomplete" if cut else "response.completed", response=self.response)]

    def error(self, e: APIError) -> dict:
        return self._event("error", code=e.code, message=e.message, param=e.param)

    def _added(self, item: dict) -> dict:
        self.output.append(item)
        return self._event("response.output_item.added", output_index=len(self.output) - 1, item=item)

    def _where(self, item: dict) -> dict:
        return {"item_id": item["id"], "output_index": self.output.index(item)}

    def _close_message(self, status: str) -> list[dict]:
        item, self.message = self.message, None
        if item is None:
            return []
        item["status"] = status
        part = item["content"][0]
        return [self._event("response.output_text.done", **self._where(item), content_index=0, text=part["text"],
                            logprobs=[]),
                self._event("response.content_part.done", **self._where(item), content_index=0, part=part),
                self._event("response.output_item.done", output_index=self.output.index(item), item=item)]
