"""Tool-call parsing and constrained JSON, without a server."""

import json
import random

import jsonschema
import pytest
import torch

from qwen2.server.structured import Grammars, tool_call_schema
from qwen2.tools import ToolCallStream, collect, json_value_end, messages_with_tools, parse_tool_calls

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


def _stream(reply: str, names=(), seed: int = 0, longest: int = 6) -> tuple[str, list, list]:
    """Feed `reply` in random pieces; returns (content, calls, every delta) as a client assembles them."""
    rng = random.Random(seed)
    stream, deltas, i = ToolCallStream(names), [], 0
    while i < len(reply):
        n = rng.randint(1, longest)
        deltas += stream.push(reply[i:i + n])
        i += n
    deltas += stream.finish()
    content, calls = collect(deltas)
    return content, calls, deltas


def test_streamed_calls_equal_parsed_calls_however_the_text_is_split():
    for seed in range(100):
        content, calls, deltas = _stream(REPLY, seed=seed)
        assert all("<" not in d.content for d in deltas)  # no piece of a tag ever leaks out as content
        assert content.strip() == "Let me check."
        assert [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city": "Paris"}'), ("get_time", "{}")]


def test_arguments_stream_as_they_are_generated():
    reply = '<tool_call>\n{"name": "f", "arguments": {"code": "a = {\\"}\\"}\\n", "n": [1, {"x": 2}]}}\n</tool_call>'
    arguments = json.loads(reply.split("\n")[1])["arguments"]
    for seed in range(50):
        content, calls, deltas = _stream(reply, seed=seed, longest=4)
        assert content == "" and [c.name for c in calls] == ["f"] and json.loads(calls[0].arguments) == arguments
        assert sum(bool(d.arguments) for d in deltas) > 3  # in pieces, not one block at the end
        assert deltas[0].call is not None  # the name comes first, before the arguments are complete


def test_a_call_in_another_key_order_is_sent_whole_when_it_closes():
    reply = '<tool_call>\n{"arguments": {"city": "Paris"}, "name": "get_weather"}\n</tool_call>'
    content, calls, deltas = _stream(reply)
    assert content == "" and [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert sum(d.call is not None for d in deltas) == 1


def test_a_call_cut_before_its_end_tag_still_counts():
    content, calls, _ = _stream('Sure.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}')
    assert content == "Sure.\n" and json.loads(calls[0].arguments) == {"a": 1}


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
    content, calls, _ = _stream(reply, NAMES, seed=1, longest=5)
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


def test_json_value_end_finds_the_end_of_objects_strings_and_numbers_across_pieces():
    assert json_value_end('{"a": "}", "b": [1, {"c": 2}]} tail', [0, False, False, False]) == 30
    assert json_value_end(' "x\\"y", next', [0, False, False, False]) == 7
    assert json_value_end("42}", [0, False, False, False]) == 2
    state = [0, False, False, False]
    assert json_value_end('{"a": "{', state) is None and json_value_end('"}', state) == 2


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CHAT = [{"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "rain"}]


@pytest.mark.parametrize("system", [[], [{"role": "system", "content": "Be brief."}]])
def test_a_template_without_tools_renders_what_qwen25s_template_renders(default_tokenizer, system):
    """Qwen2-Instruct's plain ChatML template gets the tools, calls and results written into the
    messages: the prompt is the one Qwen2.5's own tools branch writes (the format it was trained on)."""
    from qwen2.tokenizer import FALLBACK_CHAT_TEMPLATE, Tokenizer

    plain = Tokenizer(default_tokenizer._tok, chat_template=FALLBACK_CHAT_TEMPLATE)
    qwen25 = default_tokenizer.apply_chat_template(system + CHAT, tools=TOOLS)
    assert plain.apply_chat_template(system + CHAT, tools=TOOLS) == qwen25
    assert "<tools>" not in plain.apply_chat_template(system + CHAT[:1])  # no tools: the template as it is
    assert messages_with_tools(CHAT[:1], None) == CHAT[:1]


@pytest.mark.parametrize("parallel", [True, False])
def test_parallel_tool_calls_false_keeps_a_replys_first_call(default_tokenizer, parallel):
    from qwen2.engine.engine import Output
    from qwen2.engine.sampling import SamplingParams
    from qwen2.server.generation import Choice
    from qwen2.server.responses import ChatFormat

    def fmt():
        return ChatFormat(default_tokenizer, "m", NAMES, "", logprobs=False, parallel=parallel)

    choice = Choice(0, [1], SamplingParams(), text=REPLY, finish_reason="stop")
    message = fmt().response([choice], {})["choices"][0]["message"]
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather", "get_time"][: 2 if parallel else 1]
    stream = fmt()
    stream.head([choice])
    chunks = [stream.piece(choice, Output(0, 1, REPLY[i:i + 3])) for i in range(0, len(REPLY), 3)]
    entries = [e for c in chunks + stream.tail(choice) if c for e in c["choices"][0]["delta"].get("tool_calls", [])]
    assert {e["index"] for e in entries} == ({0, 1} if parallel else {0})
    assert json.loads("".join(e["function"]["arguments"] for e in entries if e["index"] == 0)) == {"city": "Paris"}
