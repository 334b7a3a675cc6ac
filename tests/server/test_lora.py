"""`qwen2 serve --lora NAME=PATH`: each adapter is a model of its own name (parent: the base)
in /v1/models; a request naming it runs it, one naming the base (or none) runs the base,
unchanged even beside adapter requests in the same batch; an unknown name is OpenAI's 404; a bad
adapter stops the server at start with one line. A real server process on loopback, the
official openai client, the tiny random model."""

import asyncio
import subprocess
import sys

import openai
import pytest
import torch

from qwen2.loading import load_model
from qwen2.train.lora import add_lora, lora_layers, save_adapter
from tests.server.conftest import _launch, _tiny_checkpoint

CHAT = [{"role": "user", "content": "Write a haiku about the sea."}]
GREEDY = dict(temperature=0, max_tokens=12, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def folders(tmp_path_factory, default_tokenizer):
    root = tmp_path_factory.mktemp("lora-server")
    tiny = _tiny_checkpoint(root / "tiny", default_tokenizer)
    model = load_model(tiny, quant="none", dtype="float32", device="cpu")[0]
    add_lora(model, rank=4, alpha=8, targets=("q_proj", "v_proj", "up_proj", "down_proj"))
    torch.manual_seed(0)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=1.0)
    save_adapter(model, root / "sql")
    return tiny, root / "sql"


@pytest.fixture(scope="module")
def server(folders, tmp_path_factory):
    tiny, adapter = folders
    process = _launch("lora", tiny, ["--ctx", "1024", "--dtype", "float32", "--quant", "none", "--max-concurrency", "4",
                                     "--lora", f"sql={adapter}"], tmp_path_factory.mktemp("lora-logs"))
    yield process.wait_ready()
    process.process.terminate()
    process.process.wait(timeout=10)


def chat(server, model: str) -> str:
    return server.client().chat.completions.create(model=model, messages=CHAT, **GREEDY).choices[0].message.content


def test_each_adapter_is_a_model_whose_parent_is_the_base(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["tiny", "sql"]
    adapter = client.models.retrieve("sql")
    assert adapter.id == "sql" and adapter.parent == "tiny"
    assert client.models.retrieve("tiny").id == "tiny"


def test_a_request_naming_the_adapter_runs_it_and_the_base_is_unchanged(server):
    base, tuned = chat(server, "tiny"), chat(server, "sql")
    assert tuned != base
    # without `model`, the base model, as before adapters
    raw = server.request("POST", "/v1/chat/completions", {"messages": CHAT, "temperature": 0, "max_tokens": 12,
                                                          "ignore_eos": True}).json()
    assert raw["choices"][0]["message"]["content"] == base and raw["model"] == "tiny"
    response = server.client().completions.create(model="sql", prompt="SELECT", **GREEDY)
    assert response.model == "sql"
    assert response.choices[0].text != server.client().completions.create(model="tiny", prompt="SELECT",
                                                                          **GREEDY).choices[0].text
    stream = server.client().chat.completions.create(model="sql", messages=CHAT, stream=True, **GREEDY)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == tuned


def test_base_and_adapter_requests_batched_together_keep_their_own_outputs(server):
    alone = {m: chat(server, m) for m in ("tiny", "sql")}

    async def together() -> list[str]:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        replies = await asyncio.gather(*(client.chat.completions.create(model=m, messages=CHAT, **GREEDY)
                                         for m in ("tiny", "sql") * 2))
        return [r.choices[0].message.content for r in replies]

    assert asyncio.run(together()) == [alone["tiny"], alone["sql"]] * 2


def test_an_unknown_model_is_a_404_model_not_found(server):
    with pytest.raises(openai.NotFoundError) as e:
        server.client().chat.completions.create(model="nope", messages=CHAT, max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    assert "'sql'" in e.value.body["message"]
    r = server.request("POST", "/v1/completions", {"model": "nope", "prompt": "x", "max_tokens": 2})
    assert r.status == 404 and r.json()["error"]["code"] == "model_not_found"
    assert server.request("GET", "/v1/models/nope").status == 404


@pytest.mark.parametrize("lora, message", [
    ("sql", "--lora takes NAME=PATH"),
    ("tiny={adapter}", "the name is taken by the base model"),
    ("bad={adapter}/missing", "no adapter_config.json"),
])
def test_a_bad_adapter_stops_the_server_at_start_with_one_line(folders, lora, message):
    tiny, adapter = folders
    result = subprocess.run([sys.executable, "-m", "qwen2.server", "--model", str(tiny), "--quant", "none",
                             "--lora", lora.format(adapter=adapter)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
