"""POST /v1/docqa mounted on the real app, served by uvicorn on loopback, driven over HTTP."""

import socket
import threading
import time

import pytest
import requests

from qwen2.agent.routes import docqa_router
from qwen2.engine.engine import Engine
from qwen2.engine.llm import LLM
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def server_url(default_tokenizer):
    import torch
    import uvicorn

    from qwen2.model import Transformer
    from qwen2.server.app import Settings, create_app

    torch.manual_seed(0)
    model = Transformer(tiny_config(max_position_embeddings=4096)).eval()
    llm = LLM(model, default_tokenizer, Engine(model, default_tokenizer, max_slots=4, max_seq_len=4096))
    app = create_app(llm, Settings())
    app.include_router(docqa_router())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_an_uploaded_document_is_answered_with_evidence_fields(server_url):
    from qwen2.eval.data import haystack_text

    text = haystack_text()[:6000]
    r = requests.post(f"{server_url}/v1/docqa", files={"file": ("notes.md", text.encode(), "text/markdown")},
                   data={"question": "What does the document say about Romania?", "level": "1", "budget": "1024"},
                   timeout=300)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["level"] == 1 and body["document_tokens"] > 1200
    assert isinstance(body["answer"], str) and body["keywords"]["information"]
    assert set(body) >= {"answer", "evidence", "keywords", "rounds", "seconds"}


def test_a_binary_upload_gets_a_clear_400(server_url):
    r = requests.post(f"{server_url}/v1/docqa", files={"file": ("photo.jpg", bytes(range(256)) * 4, "image/jpeg")},
                   data={"question": "what is this?"}, timeout=60)
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert "photo.jpg: this is a binary file" in message and "\n" not in message


def test_a_missing_question_is_a_400_naming_the_field(server_url):
    r = requests.post(f"{server_url}/v1/docqa", files={"file": ("a.txt", b"text", "text/plain")}, timeout=60)
    assert r.status_code == 400 and "question" in r.json()["error"]["message"]
