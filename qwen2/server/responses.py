"""OpenAI's response shapes: chat completions and completions, whole or as stream chunks.

A format turns the engine's outputs into JSON: `head` opens a stream, `piece` turns one output
into a chunk (or nothing), `tail` closes one choice, `response` builds the non-streamed body.
Tool calls are parsed here (qwen2.tools) when the request rendered tools.
"""

from __future__ import annotations

import itertools
import secrets
import time
from typing import Any

from qwen2.engine.engine import Output
from qwen2.server.generation import Choice
from qwen2.tokenizer import Tokenizer
from qwen2.tools import Delta, ToolCall, ToolCallStream, parse_tool_calls


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: every byte as a printable character (how BPE tokens are spelled)."""
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in visible]
    return {**{b: chr(b) for b in visible}, **{b: chr(256 + i) for i, b in enumerate(others)}}


_BYTE_OF = {c: b for b, c in _bytes_to_unicode().items()}


def token_bytes(tokenizer: Tokenizer, token: int) -> bytes:
    """The bytes a token stands for; special tokens are their own text."""
    spelled = tokenizer.id_to_token(token) or ""
    return b"".join(bytes([_BYTE_OF[ch]]) if ch in _BYTE_OF else ch.encode() for ch in spelled)


def usage(choices: list[Choice], n: int) -> dict[str, Any]:
    """Prompt tokens count once per prompt (each prompt has n choices)."""
    firsts = choices[::n]
    return {"prompt_tokens": sum(len(c.prompt) for c in firsts),
            "completion_tokens": sum(c.completion_tokens for c in choices),
            "total_tokens": sum(len(c.prompt) for c in firsts) + sum(c.completion_tokens for c in choices),
            "prompt_tokens_details": {"cached_tokens": sum(c.request.cached_tokens for c in firsts if c.request)}}


class Format:
    object = ""

    def __init__(self, tokenizer: Tokenizer, model: str, prefix: str):
        self.tokenizer, self.model = tokenizer, model
        self.id, self.created = f"{prefix}-{secrets.token_hex(12)}", int(time.time())

    def envelope(self, choices: list[dict], object: str | None = None, **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": object or self.object, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def head(self, choices: list[Choice]) -> list[dict]:
        return []

    def piece(self, choice: Choice, out: Output) -> dict | None:
        raise NotImplementedError

    def tail(self, choice: Choice) -> list[dict]:
        raise NotImplementedError

    def response(self, choices: list[Choice], usage: dict) -> dict:
        raise NotImplementedError


class ChatFormat(Format):
    """Tool calls, when the request rendered tools: parsed from the reply (qwen2.tools), streamed
    as OpenAI does (a call's id and name first, then its arguments in pieces); with
    `parallel` False only a reply's first call is kept."""

    object = "chat.completion.chunk"

    def __init__(self, tokenizer: Tokenizer, model: str, tools: tuple[str, ...], prefill: str, logprobs: bool,
                 parallel: bool = True):
        super().__init__(tokenizer, model, "chatcmpl")
        self.tools, self.prefill, self.logprobs = tools, prefill, logprobs  # tools: the declared names
        self.parallel = parallel
        self.streams: dict[int, ToolCallStream] = {}
        self.called: dict[int, int] = {}  # tool calls sent so far, per choice
        self.dropping: dict[int, bool] = {}  # whether a choice's current call is past the first (not parallel)

    def _entry(self, token: int, logprob: float) -> dict:
        raw = token_bytes(self.tokenizer, token)
        return {"token": raw.decode(errors="replace"), "logprob": logprob, "bytes": list(raw)}

    def _logprobs(self, outs: list[Output]) -> dict | None:
        if not self.logprobs:
            return None
        return {"content": [self._entry(o.token, o.logprob) | {"top_logprobs": [self._entry(t, lp) for t, lp in
                                                                                 o.top_logprobs or []]}
                            for o in outs]}

    def _kept(self, calls: list[ToolCall]) -> list[ToolCall]:
        return calls if self.parallel else calls[:1]

    def _chunk(self, index: int, delta: dict, logprobs: dict | None = None, finish: str | None = None) -> dict:
        return self.envelope([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}])

    def head(self, choices: list[Choice]) -> list[dict]:
        for c in choices:
            if self.tools:
                self.streams[c.index] = ToolCallStream(self.tools)
                self.streams[c.index].push(self.prefill)
        return [self._chunk(c.index, {"role": "assistant", "content": ""}) for c in choices]

    def _delta(self, index: int, deltas: list[Delta]) -> dict:
        """One chunk's delta from the stream's pieces: content, and tool_calls entries by call index."""
        content, entries = "", []
        for d in deltas:
            content += d.content
            if d.call is not None:
                sent = self.called.get(index, 0)
                self.dropping[index] = not self.parallel and sent > 0
                if self.dropping[index]:
                    continue
                self.called[index] = sent + 1
                entries.append({"index": sent, "id": d.call.id, "type": "function",
                                "function": {"name": d.call.name, "arguments": d.call.arguments}})
            if d.arguments and not self.dropping.get(index):
                current = self.called[index] - 1
                if entries and entries[-1]["index"] == current:
                    entries[-1]["function"]["arguments"] += d.arguments
                else:
                    entries.append({"index": current, "function": {"arguments": d.arguments}})
        delta: dict[str, Any] = {"content": content} if content else {}
        if entries:
            delta["tool_calls"] = entries
        return delta

    def piece(self, choice: Choice, out: Output) -> dict | None:
        deltas = self.streams[choice.index].push(out.text) if self.tools else [Delta(content=out.text)]
        logprobs = self._logprobs([out]) if out.logprob is not None else None
        delta = self._delta(choice.index, deltas)
        return self._chunk(choice.index, delta, logprobs) if delta or logprobs else None

    def _finish_reason(self, choice: Choice) -> str | None:
        return "tool_calls" if self.called.get(choice.index) else choice.finish_reason

    def tail(self, choice: Choice) -> list[dict]:
        delta = self._delta(choice.index, self.streams[choice.index].finish()) if self.tools else {}
        return ([self._chunk(choice.index, delta)] if delta else []) + [
            self._chunk(choice.index, {}, finish=self._finish_reason(choice))]

    def response(self, choices: list[Choice], usage: dict) -> dict:
        out = []
        for c in choices:
            content, calls = parse_tool_calls(self.prefill + c.text, self.tools) if self.tools else (c.text, [])
            calls = self._kept(calls)
            message: dict[str, Any] = {"role": "assistant", "content": content or (None if calls else "")}
            if calls:
                self.called[c.index] = len(calls)
                message["tool_calls"] = [{"id": call.id, "type": "function",
                                          "function": {"name": call.name, "arguments": call.arguments}}
                                         for call in calls]
            out.append({"index": c.index, "message": message, "logprobs": self._logprobs(c.logprobs),
                        "finish_reason": self._finish_reason(c)})
        return self.envelope(out, "chat.completion", usage=usage)


class CompletionFormat(Format):
    """With `echo`, a choice's text starts with its prompt (its tokens decoded) and its logprobs with
    the prompt's tokens (the first has none), as OpenAI's legacy completions do; streamed, the prompt
    comes with the first chunk. With best_of candidates per prompt (more than n, not streamed), the
    reply keeps the n whose sampled tokens' logprobs sum highest (vLLM's rule)."""

    object = "text_completion"

    def __init__(self, tokenizer: Tokenizer, model: str, logprobs: bool, echo: bool = False, n: int = 1,
                 best_of: int = 1):
        super().__init__(tokenizer, model, "cmpl")
        self.logprobs, self.echo, self.n, self.best_of = logprobs, echo, n, best_of
        self.prompts: dict[int, tuple[str, list[tuple]]] = {}  # by choice index: its echoed prompt

    def _prompt(self, choice: Choice) -> tuple[str, list[tuple]]:
        """The prompt's text and its tokens as (token, text, logprob, top) entries."""
        if choice.index not in self.prompts:
            decoder = self.tokenizer.stream_decoder()
            pieces = [decoder.push(t) for t in choice.prompt]
            pieces[-1] += decoder.flush()
            scores = [s or (None, None) for s in choice.request.prompt_logprobs]  # none unless asked for
            entries = [(t, piece, *s) for t, piece, s in zip(choice.prompt, pieces, scores)]
            self.prompts[choice.index] = "".join(pieces), entries
        return self.prompts[choice.index]

    def _logprobs(self, entries: list[tuple], offset: int) -> dict | None:
        """OpenAI's logprobs object of (token, text, logprob, top) entries, the first text at `offset`."""
        if not self.logprobs:
            return None
        offsets = itertools.accumulate((len(text) for _, text, *_ in entries), initial=offset)
        return {"tokens": [self._token(t) for t, *_ in entries], "token_logprobs": [lp for _, _, lp, _ in entries],
                "top_logprobs": [None if top is None else {self._token(t): lp for t, lp in top} for *_, top in entries],
                "text_offset": list(offsets)[:-1]}

    def _token(self, token: int) -> str:
        return token_bytes(self.tokenizer, token).decode(errors="replace")

    def _choice(self, index: int, text: str, logprobs: dict | None, finish: str | None) -> dict:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def piece(self, choice: Choice, out: Output) -> dict | None:
        entries = [(out.token, out.text, out.logprob, out.top_logprobs or [])] if out.logprob is not None else []
        text, offset = out.text, len(choice.text) - len(out.text)
        if self.echo:
            first = choice.index not in self.prompts
            prompt, scored = self._prompt(choice)
            if first:
                text, entries = prompt + text, scored + entries
            else:
                offset += len(prompt)
        if not text and not entries:
            return None
        logprobs = self._logprobs(entries, offset) if entries else None
        return self.envelope([self._choice(choice.index, text, logprobs, None)])

    def tail(self, choice: Choice) -> list[dict]:
        return [self.envelope([self._choice(choice.index, "", None, choice.finish_reason)])]

    def response(self, choices: list[Choice], usage: dict) -> dict:
        kept = []
        for start in range(0, len(choices), self.best_of):  # each prompt's candidates
            candidates = choices[start: start + self.best_of]
            if self.best_of > self.n:
                candidates = sorted(candidates, key=lambda c: sum(o.logprob for o in c.logprobs), reverse=True)
            kept += candidates[:self.n]
        out = []
        for index, c in enumerate(kept):
            text, entries = c.text, [(o.token, o.text, o.logprob, o.top_logprobs or []) for o in c.logprobs]
            if self.echo:
                prompt, scored = self._prompt(c)
                text, entries = prompt + text, scored + entries
            out.append(self._choice(index, text, self._logprobs(entries, 0), c.finish_reason))
        return self.envelope(out, usage=usage)
