"""Qwen2.5's Hermes-style tool calls: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`.

Small models often write the call without its tags: a reply that is nothing but such a JSON object
(or a list of them), bare or in a ``` fence, naming a declared tool, is a call too (`names`).

`parse_tool_calls` splits a finished reply into content and calls. `ToolCallStream` does the same
while streaming: text before a `<tool_call>` streams as content; inside a call, the name is sent
once it is written and the arguments as they are generated (OpenAI's streamed `tool_calls`
deltas). A call whose JSON does not begin `{"name": "...", "arguments": ` is held until its end
tag and sent whole; a bare call is known only when the reply ends, so it is held too.

`messages_with_tools` writes the tools, the calls and their results into plain ChatML messages
in the same format, for chat templates that have no tools branch (Qwen2-Instruct's), so every
Qwen2-family model can call tools. Not covered: Qwen-Agent's `✿FUNCTION✿` format.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Collection
from dataclasses import dataclass

TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
_FENCED = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.DOTALL)
# the head of a call as the template teaches it; the arguments stream from its end
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')
BARE_STARTS = ("{", "[", "`")  # how a reply that may be a bare call begins


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object as text, as OpenAI sends it
    id: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or f"call_{secrets.token_hex(12)}"


@dataclass
class Delta:
    """One piece of a streamed reply: content to show, a call that begins (its id and name, and
    the arguments known so far), or more of the arguments of the call begun last."""

    content: str = ""
    call: ToolCall | None = None
    arguments: str = ""


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


def json_value_end(text: str, state: list) -> int | None:
    """Where the JSON value that `text` continues ends (an index into `text`), or None if it goes
    on. `state` ([depth, in string, escaped, started]) carries the scan from one piece to the next."""
    depth, in_string, escaped, started = state
    for i, ch in enumerate(text):
        if not started:
            if ch.isspace():
                continue
            started = True
        if in_string:
            escaped, in_string = (False, True) if escaped else (ch == "\\", ch != '"')
            if not in_string and depth == 0:
                return i + 1  # a string value
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]" or (depth == 0 and ch in ",\n"):
            depth -= ch in "}]"
            if depth <= 0:  # a closed object or list, or the delimiter after a number or literal
                return i + 1 if depth == 0 and ch in "}]" else i
    state[:] = depth, in_string, escaped, started
    return None


class ToolCallStream:
    """Feeds streamed text in; returns the Deltas it releases now. With the declared tools'
    `names`, a reply that begins like a bare call is held until it ends."""

    def __init__(self, names: Collection[str] = ()) -> None:
        self.buffer = ""  # text received and not released yet
        self.inside = ""  # "" (content), "head", "arguments", "after" (the arguments closed), "whole"
        self.scan: list = []
        self.called = False
        self.names, self.shown = names, False
        self.longest_head = 40 + max(map(len, names), default=64)

    def push(self, text: str) -> list[Delta]:
        self.buffer += text
        out: list[Delta] = []
        while self._step(out):
            pass
        return [d for d in out if d.content or d.call or d.arguments]

    def _step(self, out: list[Delta]) -> bool:
        """Release what the buffer allows in the current place; True if the place changed."""
        if not self.inside:
            if self.names and not self.shown and (not self.buffer.strip() or self.buffer.lstrip()[0] in BARE_STARTS):
                return False  # perhaps a call written without its tags: known only at the end
            start = self.buffer.find(TOOL_CALL_START)
            if start < 0:  # hold back a tail that may be the beginning of a start tag
                hold = max((n for n in range(1, len(TOOL_CALL_START)) if self.buffer.endswith(TOOL_CALL_START[:n])),
                           default=0)
                self._show(out, self.buffer[: len(self.buffer) - hold])
                self.buffer = self.buffer[len(self.buffer) - hold:]
                return False
            self._show(out, self.buffer[:start])
            self.buffer, self.inside = self.buffer[start + len(TOOL_CALL_START):], "head"
            return True
        if self.inside == "head":
            head = _HEAD.match(self.buffer)
            if head:
                name = json.loads(f'"{head.group(1)}"')
                out.append(Delta(call=ToolCall(name, "")))
                self.buffer, self.inside, self.scan = self.buffer[head.end():], "arguments", [0, False, False, False]
                self.called = True
                return True
            if TOOL_CALL_END in self.buffer or len(self.buffer) > self.longest_head:
                self.inside = "whole"  # not the usual head: parse the block once it closes
                return True
            return False
        if self.inside == "arguments":
            if not self.scan[3]:  # the space before the value is layout: arguments begin at the value
                self.buffer = self.buffer.lstrip()
            end = json_value_end(self.buffer, self.scan)
            out.append(Delta(arguments=self.buffer if end is None else self.buffer[:end]))
            self.buffer = "" if end is None else self.buffer[end:]
            self.inside = "arguments" if end is None else "after"
            return end is not None
        end = self.buffer.find(TOOL_CALL_END)  # "after" and "whole" wait for the end tag
        if end < 0:
            return False
        if self.inside == "whole":
            content, calls = parse_tool_calls(TOOL_CALL_START + self.buffer[: end + len(TOOL_CALL_END)])
            self._show(out, content)
            out += [Delta(call=c) for c in calls]
            self.called = self.called or bool(calls)
        self.buffer, self.inside = self.buffer[end + len(TOOL_CALL_END):], ""
        return True

    def finish(self) -> list[Delta]:
        """Whatever is still held when the reply ends (an unclosed last call is parsed too)."""
        out: list[Delta] = []
        if self.inside in ("", "head", "whole"):
            text = self.buffer if not self.inside else TOOL_CALL_START + self.buffer
            content, calls = parse_tool_calls(text, () if self.shown or self.inside else self.names)
            self._show(out, content)
            out += [Delta(call=c) for c in calls]
        self.buffer, self.inside = "", ""
        return [d for d in out if d.content or d.call]

    def _show(self, out: list[Delta], text: str) -> None:
        # the newlines between and after calls are layout, not content
        if text and not (self.called and text.isspace()):
            out.append(Delta(content=text))
            self.shown = True


def collect(deltas: list[Delta]) -> tuple[str, list[ToolCall]]:
    """Deltas joined back into (content, calls): what a client assembles from a stream."""
    content, calls = "", []
    for d in deltas:
        content += d.content
        if d.call:
            calls.append(ToolCall(d.call.name, d.call.arguments, d.call.id))
        if d.arguments:
            calls[-1].arguments += d.arguments
    return content, calls


# -- tools for templates without a tools branch --------------------------------------------------
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def tools_prompt(tools: list[dict]) -> str:
    """The tools section of the system message, in the words Qwen2.5 was trained on."""
    signatures = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{signatures}\n"
            "</tools>\n\nFor each function call, return a json object with function name and arguments within "
            f'{TOOL_CALL_START}{TOOL_CALL_END} XML tags:\n{TOOL_CALL_START}\n{{"name": <function-name>, '
            f'"arguments": <args-json-object>}}\n{TOOL_CALL_END}')


def _call_text(call: dict) -> str:
    function = call.get("function", call)
    arguments = json.dumps(function.get("arguments") or {}, ensure_ascii=False)  # as Qwen2.5's `| tojson`
    return f'{TOOL_CALL_START}\n{{"name": "{function["name"]}", "arguments": {arguments}}}\n{TOOL_CALL_END}'


def messages_with_tools(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """Plain system/user/assistant messages that carry the tools (in the system message), the
    assistant's calls and the tools' results (user turns of <tool_response> blocks) as text."""
    out: list[dict] = []
    if tools:
        first_system = messages and messages[0]["role"] == "system"
        system = messages[0]["content"] if first_system else DEFAULT_SYSTEM
        out.append({"role": "system", "content": system + tools_prompt(tools)})
        messages = messages[1:] if first_system else messages
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            text = "\n".join([m["content"]] * bool(m.get("content")) + [_call_text(c) for c in m["tool_calls"]])
            out.append({"role": "assistant", "content": text})
        elif m["role"] == "tool":
            result = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if out and out[-1].get("tool_results"):  # consecutive results share one user turn
                out[-1]["content"] += "\n" + result
            else:
                out.append({"role": "user", "content": result, "tool_results": True})
        else:
            out.append(dict(m))
    return [{k: v for k, v in m.items() if k != "tool_results"} for m in out]
