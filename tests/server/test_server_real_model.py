"""Where the content matters: the real default model answers, calls tools, and writes valid JSON."""

import json

import jsonschema

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The current time"}}
ANSWER = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 80}}, "required": ["answer"],
          "additionalProperties": False}
QUESTION = {"role": "user", "content": "What's the weather in Paris?"}


def test_chat_answer(default_server):
    r = default_server.client().chat.completions.create(
        model="default", temperature=0, max_tokens=8,
        messages=[{"role": "user", "content": "What is the capital of France? Answer with one word."}])
    assert "Paris" in r.choices[0].message.content and r.choices[0].finish_reason == "stop"


def _final_answer(client, call: dict, stream: bool) -> str:
    """Turn two: the call and its result go back through the template and the model answers. The
    0.5B model tends to repeat the call as JSON here, so the answer is asked for as {"answer": text}:
    it can only say 18 if the tool result reached it."""
    messages = [QUESTION, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": call["id"], "content": '{"temperature_c": 18, "sky": "sunny"}'}]
    kwargs = dict(model="default", messages=messages, tools=[WEATHER], temperature=0, max_tokens=40,
                  response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER}})
    if not stream:
        r = client.chat.completions.create(**kwargs)
        assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
        text = r.choices[0].message.content
    else:
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs)
                       if c.choices)
    return json.loads(text)["answer"]


def test_tool_round_trip(default_server):
    client = default_server.client()
    r = client.chat.completions.create(model="default", messages=[QUESTION], tools=[WEATHER, CLOCK],
                                       tool_choice="required", temperature=0, max_tokens=32)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert "18" in _final_answer(client, call.model_dump(), stream=False)


def test_tool_round_trip_streamed(default_server):
    client = default_server.client()
    chunks = list(client.chat.completions.create(
        model="default", messages=[QUESTION], tools=[WEATHER], stream=True, temperature=0, max_tokens=32,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    pieces = [t for d in deltas for t in d.tool_calls or []]
    assert not any(d.content for d in deltas)  # the call never leaks out as text
    # OpenAI's stream shape: the call's id and name first, then its arguments in pieces, all under index 0
    assert pieces[0].id.startswith("call_") and pieces[0].function.name == "get_weather"
    assert {p.index for p in pieces} == {0} and len(pieces) > 2 and all(p.id is None for p in pieces[1:])
    arguments = "".join(p.function.arguments or "" for p in pieces)
    assert json.loads(arguments)["city"] and chunks[-1].choices[0].finish_reason == "tool_calls"
    as_message = {"id": pieces[0].id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    assert "18" in _final_answer(client, as_message, stream=True)


def test_a_tool_without_arguments_gets_an_empty_object(default_server):
    r = default_server.client().chat.completions.create(
        model="default", messages=[{"role": "user", "content": "What time is it?"}], tools=[CLOCK],
        tool_choice={"type": "function", "function": {"name": "get_time"}}, temperature=0, max_tokens=24)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_time" and isinstance(json.loads(call.function.arguments), dict)


def test_json_schema_response_validates(default_server):
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "age", "languages"],
              "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0},
                             "languages": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                           "maxItems": 2}}}
    r = default_server.client().chat.completions.create(
        model="default", temperature=0, max_tokens=60,
        messages=[{"role": "user", "content": "Describe a made-up programmer."}],
        response_format={"type": "json_schema", "json_schema": {"name": "programmer", "schema": schema,
                                                                "strict": True}})
    assert r.choices[0].finish_reason == "stop"  # the grammar forced <|im_end|> after the closing brace
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_a_call_written_without_its_tags_is_still_a_call(default_server):
    """The 0.5B model answers this with a fenced or bare JSON call, no <tool_call> tags (greedy)."""
    client = default_server.client()
    for question in ("What's the weather in Paris right now?", "Is it raining in Tokyo?"):
        kwargs = dict(model="default", messages=[{"role": "user", "content": question}], tools=[WEATHER],
                      temperature=0, max_tokens=60)
        choice = client.chat.completions.create(**kwargs).choices[0]
        assert choice.finish_reason == "tool_calls" and not choice.message.content
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"]
        chunks = list(client.chat.completions.create(stream=True, **kwargs))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        streamed = [t for d in deltas for t in d.tool_calls or []]
        assert [t.function.arguments for t in streamed] == [call.function.arguments]
        assert not any(d.content for d in deltas) and chunks[-1].choices[0].finish_reason == "tool_calls"


def _call(server, stream: bool, **kwargs) -> tuple[str | None, list[tuple[str, dict]]]:
    """(content, [(name, arguments)]) of a greedy reply, assembled from the stream when streamed."""
    kwargs = dict(model="default", temperature=0, max_tokens=60) | kwargs
    client = server.client()
    if not stream:
        message = client.chat.completions.create(**kwargs).choices[0].message
        return message.content, [(t.function.name, json.loads(t.function.arguments)) for t in message.tool_calls or []]
    content, calls = "", {}
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        delta = chunk.choices[0].delta if chunk.choices else None
        content += (delta and delta.content) or ""
        for t in (delta and delta.tool_calls) or []:
            name, arguments = calls.get(t.index, ("", ""))
            calls[t.index] = (name + (t.function.name or ""), arguments + (t.function.arguments or ""))
    return content or None, [(name, json.loads(arguments)) for name, arguments in calls.values()]


def test_a_template_without_a_tools_branch_serves_tool_calls(default_server, plain_template_server):
    """Qwen2-Instruct's template has no tools branch: the tools are written into the messages in
    Qwen2.5's format, so the model makes the same calls as behind its own template."""
    weather = [{"role": "user", "content": "What's the weather in Paris right now?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    for stream, choice in ((False, "auto"), (False, "required"), (True, named)):
        asked = dict(messages=weather, tools=[WEATHER, CLOCK], tool_choice=choice)
        content, calls = _call(plain_template_server, stream, **asked)
        assert not content and calls == [("get_weather", {"city": "Paris"})], (stream, choice)
        assert _call(default_server, stream, **asked) == (content, calls)
    # the reply to the tool's result, and tool_choice "none": plain answers
    result = [{"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature_c": 18, "sky": "sunny"}'}]
    content, calls = _call(plain_template_server, True, max_tokens=30, tools=[WEATHER], messages=weather + result)
    assert "18" in content and not calls
    content, calls = _call(plain_template_server, False, messages=weather, tools=[WEATHER], tool_choice="none")
    assert content and not calls


def test_a_suffix_fills_in_the_middle(default_server):
    """Qwen2.5-Coder's FIM tokens: the completion is the body between the prefix and the suffix."""
    client = default_server.client()
    prefix, suffix = "def is_even(n: int) -> bool:\n    ", "\n\n\nprint(is_even(4))\n"
    filled = client.completions.create(model="default", prompt=prefix, suffix=suffix, max_tokens=24,
                                       temperature=0).choices[0]
    assert filled.text.startswith("return n % 2 == 0") and filled.finish_reason == "stop"
    plain = client.completions.create(model="default", prompt=prefix, max_tokens=24, temperature=0).choices[0]
    assert plain.text != filled.text and plain.finish_reason == "length"  # the suffix changed what was written
