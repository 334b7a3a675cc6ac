"""A real agent framework against the server: LangChain's ChatOpenAI, as people drive Qwen with it
(bind_tools, a tool loop, streaming, structured output), on the default model."""

import json

import pytest

langchain_openai = pytest.importorskip("langchain_openai", reason="the dev extra installs langchain-openai")
from langchain_core.messages import HumanMessage, ToolMessage  # noqa: E402
from langchain_core.tools import tool  # noqa: E402


@tool
def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return json.dumps({"city": city, "temperature_c": 18, "sky": "sunny"})


def test_a_langchain_tool_loop(default_server):
    llm = langchain_openai.ChatOpenAI(base_url=default_server.url + "/v1", api_key="unused", model="default",
                                      temperature=0, max_tokens=60, max_retries=0)
    question = [HumanMessage("What's the weather in Paris right now?")]
    ai = llm.bind_tools([get_weather]).invoke(question)
    assert [(c["name"], c["args"]) for c in ai.tool_calls] == [("get_weather", {"city": "Paris"})]
    streamed = None
    for chunk in llm.bind_tools([get_weather]).stream(question):  # arguments arrive in pieces, merged by index
        streamed = chunk if streamed is None else streamed + chunk
    assert [(c["name"], c["args"]) for c in streamed.tool_calls] == [("get_weather", {"city": "Paris"})]
    results = [ToolMessage(get_weather.invoke(c["args"]), tool_call_id=c["id"]) for c in ai.tool_calls]
    # the 0.5B model tends to repeat the call in plain text here, so the answer is asked for as JSON:
    # it can only say 18 if the tool's result reached it
    answer = {"title": "answer", "type": "object", "required": ["answer"],
              "properties": {"answer": {"type": "string", "maxLength": 80}}}
    reply = llm.with_structured_output(answer, method="json_schema").invoke(question + [ai] + results)
    assert "18" in reply["answer"]


def test_langchain_structured_output(default_server):
    llm = langchain_openai.ChatOpenAI(base_url=default_server.url + "/v1", api_key="unused", model="default",
                                      temperature=0, max_tokens=60, max_retries=0)
    schema = {"title": "capital", "description": "A country's capital city", "type": "object",
              "properties": {"country": {"type": "string"}, "capital": {"type": "string"}},
              "required": ["country", "capital"]}
    for method in ("json_schema", "function_calling"):
        answer = llm.with_structured_output(schema, method=method).invoke("What is the capital of France?")
        assert answer["capital"] == "Paris", method
