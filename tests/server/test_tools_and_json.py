"""Tool-call parsing and constrained JSON, without a server."""

import json
import random

import jsonschema
import pytest
import torch

from qwen2.server.structured import Grammars, tool_call_schema
from qwen2.tools import ToolCallStream, parse_tool_calls

REPLY = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
         '<tool_call>\n{"name": "get_time"}\n</tool_call>')


def test_parse_tool_calls():
    content, calls = parse_tool_calls(REPLY)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert calls[1].arguments == "{}" and calls[0].id.startswith("call_") and calls[0].id != calls[1].id
    # a reply that stopped right after the JSON, before its end tag
    assert parse_tool_calls('<tool_call>\n{"name": "f", "arguments": {}}')[1][0].name == "f"
    # no tags, or a block that is not a call: plain content, unchanged
    for text in ("just text", "a < b <tool", "<tool_call>not json</tool_call>"):
        assert parse_tool_calls(text) == (text, [])


def test_streamed_calls_equal_parsed_calls_however_the_text_is_split():
    rng = random.Random(0)
    for _ in range(100):
        stream, content, calls, i = ToolCallStream(), "", [], 0
        while i < len(REPLY):
            n = rng.randint(1, 6)
            shown, done = stream.push(REPLY[i:i + n])
            assert "<" not in shown  # no piece of a tag ever leaks out as content
            content, calls, i = content + shown, calls + done, i + n
        shown, done = stream.finish()
        content, calls = content + shown, calls + done
        assert content.strip() == "Let me check."
        assert [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city": "Paris"}'), ("get_time", "{}")]


NAMES = ("get_weather", "get_time")
BARE = '{"name": "get_weather", "arguments": {"city": "Paris"}}'


@pytest.mark.parametrize("reply", [BARE, f"```json\n{BARE}\n```", f"  ```\n{BARE}```\n",
                                   f'[{BARE}, {{"name": "get_time", "arguments": {{}}}}]'])
def test_a_reply_that_is_only_a_call_without_tags_is_a_call(reply):
    content, calls = parse_tool_calls(reply, NAMES)
    assert content == "" and calls[0].name == "get_weather" and json.loads(calls[0].arguments) == {"city": "Paris"}
    assert len(calls) == (2 if reply.startswith("[") else 1)
    assert parse_tool_calls(reply) == (reply, [])  # without declared tools it stays content


@pytest.mark.parametrize("reply", [
    '{"name": "delete_everything", "arguments": {}}',  # a tool nobody declared
    '{"name": "get_weather", "arguments": {}, "note": "x"}',  # more than a call
    f"Here you go: {BARE}", '{"answer": 42}', "[]", "```python\nprint(1)\n```",
])  # fmt: skip
def test_json_that_is_not_exactly_a_declared_call_stays_content(reply):
    assert parse_tool_calls(reply, NAMES) == (reply, [])


@pytest.mark.parametrize("reply", [f"```json\n{BARE}\n```", f"Sure.\n{BARE}", "{not json at all"])
def test_a_stream_holds_what_may_be_a_bare_call_until_it_ends(reply):
    rng = random.Random(1)
    stream, content, calls, i = ToolCallStream(NAMES), "", [], 0
    while i < len(reply):
        n = rng.randint(1, 5)
        shown, done = stream.push(reply[i:i + n])
        content, calls, i = content + shown, calls + done, i + n
    shown, done = stream.finish()
    content, calls = content + shown, calls + done
    assert (content, [c.name for c in calls]) == (("", ["get_weather"]) if reply.startswith("```") else (reply, []))


@pytest.fixture(scope="module")
def grammars(default_tokenizer):
    return Grammars(default_tokenizer, 151936)


def _generate(processor, tokenizer, seed: int, limit: int = 200) -> tuple[str, int]:
    """A 'model' with random logits, constrained: returns the text and the token it ended with."""
    gen = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    while len(ids) < limit:
        logits = processor(ids, torch.randn(151936, generator=gen))
        ids.append(int(logits.argmax()))
        if ids[-1] in tokenizer.eos_token_ids:
            return tokenizer.decode(ids[:-1]), ids[-1]
    raise AssertionError(f"no end token after {limit} tokens: {tokenizer.decode(ids)!r}")


def test_constrained_json_follows_the_schema_and_then_ends(grammars, default_tokenizer):
    schema = {"type": "object", "additionalProperties": False, "required": ["n", "kind", "flags", "tag"],
              "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999},
                             "kind": {"enum": ["cat", "dog"]},
                             "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
                             "tag": {"type": "string", "maxLength": 6}}}
    for seed in range(3):
        text, end = _generate(grammars.json(schema), default_tokenizer, seed)
        jsonschema.validate(json.loads(text), schema)
        assert end in default_tokenizer.eos_token_ids


def test_forced_tool_call_schema(grammars, default_tokenizer):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"enum": [1, 2]}}, "required": ["x"], "additionalProperties": False}}},
             {"type": "function", "function": {"name": "g"}}]
    text, _ = _generate(grammars.json(tool_call_schema(tools, "f")), default_tokenizer, 0)
    assert json.loads(text)["name"] == "f" and json.loads(text)["arguments"]["x"] in (1, 2)
    text, _ = _generate(grammars.json(tool_call_schema(tools)), default_tokenizer, 1)
    assert json.loads(text)["name"] in ("f", "g")
