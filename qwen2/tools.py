"""Qwen2.5's Hermes-style tool calls: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`.

Small models often write the call without its tags: a reply that is nothing but such a JSON object
(or a list of them), bare or in a ``` fence, naming a declared tool, is a call too (`names`).

`parse_tool_calls` splits a finished reply into content and calls. `ToolCallStream` does the same
while streaming: text before a `<tool_call>` streams as content, a call is buffered until its
`</tool_call>` and then emitted whole (a half-written call is never sent). Not covered: Qwen2's
original `✿FUNCTION✿` format (Qwen-Agent's), which this template does not use.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Collection
from dataclasses import dataclass

TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
_FENCED = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.DOTALL)
BARE_STARTS = ("{", "[", "`")  # how a reply that may be a bare call begins


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object as text, as OpenAI sends it
    id: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or f"call_{secrets.token_hex(12)}"


def _as_call(call: object) -> ToolCall | None:
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    args = call.get("arguments") or {}  # a tool without arguments still gets "{}"
    return ToolCall(call["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))


def _parse_one(block: str) -> ToolCall | None:
    try:
        return _as_call(json.loads(block))
    except json.JSONDecodeError:
        return None


def parse_bare_calls(text: str, names: Collection[str]) -> list[ToolCall]:
    """The calls of a reply that is only a JSON call or a list of them (bare, or in a ``` fence),
    each naming one of `names` and holding nothing but name and arguments; else none."""
    body = text.strip()
    fenced = _FENCED.fullmatch(body)
    try:
        value = json.loads(fenced.group(1) if fenced else body)
    except json.JSONDecodeError:
        return []
    items = value if isinstance(value, list) else [value]
    calls = [_as_call(item) for item in items]
    if not items or any(c is None or c.name not in names or set(i) - {"name", "arguments"}
                        for c, i in zip(calls, items)):
        return []
    return calls


def parse_tool_calls(text: str, names: Collection[str] = ()) -> tuple[str, list[ToolCall]]:
    """(content outside the tags, calls). A last block may lack its end tag (the reply stopped
    right after the JSON); a block that is not a JSON call stays in the content as written.
    With the declared tools' `names`, a reply that is only a bare call is one (module docstring)."""
    bare = parse_bare_calls(text, names) if names and TOOL_CALL_START not in text else []
    if bare:
        return "", bare
    content, calls, rest = [], [], text
    while TOOL_CALL_START in rest:
        before, _, after = rest.partition(TOOL_CALL_START)
        block, found, rest = after.partition(TOOL_CALL_END)
        call = _parse_one(block.strip())
        content.append(before)
        if call is None:
            content.append(TOOL_CALL_START + block + (TOOL_CALL_END if found else ""))
        else:
            calls.append(call)
    content.append(rest)
    return "".join(content).strip() if calls else "".join(content), calls


class ToolCallStream:
    """Feeds streamed text in; returns (content to show now, calls completed now). With the
    declared tools' `names`, a reply that begins like a bare call is held until it ends."""

    def __init__(self, names: Collection[str] = ()) -> None:
        self.buffer = ""
        self.called = False
        self.names, self.shown = names, False

    def push(self, text: str) -> tuple[str, list[ToolCall]]:
        self.buffer += text
        if self.names and not self.shown and (not self.buffer.strip() or self.buffer.lstrip()[0] in BARE_STARTS):
            return "", []  # perhaps a call written without its tags: known only at the end
        shown, calls = "", []
        while (start := self.buffer.find(TOOL_CALL_START)) >= 0:
            end = self.buffer.find(TOOL_CALL_END, start)
            if end < 0:  # inside a call: keep it until it closes
                shown, self.buffer = shown + self.buffer[:start], self.buffer[start:]
                return self._content(shown), calls
            end += len(TOOL_CALL_END)
            content, done = parse_tool_calls(self.buffer[:end])
            shown, calls, self.buffer = shown + content, calls + done, self.buffer[end:]
            self.called = self.called or bool(done)
        # hold back a tail that may be the beginning of a start tag split across pieces
        hold = max((n for n in range(1, len(TOOL_CALL_START)) if self.buffer.endswith(TOOL_CALL_START[:n])),
                   default=0)
        cut = len(self.buffer) - hold
        shown, self.buffer = shown + self.buffer[:cut], self.buffer[cut:]
        self.shown = self.shown or bool(shown) or self.called
        return self._content(shown), calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        """Whatever is still held when the reply ends (an unclosed last call is parsed too)."""
        content, calls = parse_tool_calls(self.buffer, () if self.shown else self.names)
        self.buffer = ""
        return self._content(content), calls

    def _content(self, text: str) -> str:
        # the newlines between and after calls are layout, not content
        return "" if self.called and text.isspace() else text
