"""POST /v1/docqa mounted on the real app, served by uvicorn on loopback, driven over HTTP.

Uploads are untrusted: each hostile document gets a 400 naming the file while /health and chat
keep answering; beyond --docqa-concurrency a request gets 429; a request whose client leaves or
whose time runs out has its engine work cancelled. Work is bounded by counts (engine requests,
slots held), and the CPU limits are the kernel's (RLIMIT_CPU), so no assertion is about timing."""

import contextlib
import http.client
import socket
import threading
import time
from urllib.parse import urlparse

import pytest
import requests

from qwen2.agent.docqa import OVERLAP, READING_CHUNK
from qwen2.agent.documents import Document, Limits, Source
from qwen2.engine.engine import Engine
from qwen2.engine.llm import LLM
from qwen2.server.app import Settings
from tests.agent import bombs
from tests.conftest import tiny_config

GUARDED_LIMITS = Limits(chars=200_000, pages=50, cpu=3, wall=60)
HELLO = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@contextlib.contextmanager
def serving(tokenizer, settings: Settings):
    """The app with a tiny random model behind uvicorn on a free loopback port: (url, app)."""
    import torch
    import uvicorn

    from qwen2.model import Transformer
    from qwen2.server.app import create_app

    torch.manual_seed(0)
    model = Transformer(tiny_config(max_position_embeddings=4096)).eval()
    llm = LLM(model, tokenizer, Engine(model, tokenizer, max_concurrency=4, max_seq_len=4096))
    app = create_app(llm, settings)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", app
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def server_url(default_tokenizer):
    with serving(default_tokenizer, Settings()) as (url, _):
        yield url


@pytest.fixture(scope="module")
def guarded(default_tokenizer):
    """One docqa request at a time, small document limits."""
    with serving(default_tokenizer, Settings(docqa_concurrency=1, document_limits=GUARDED_LIMITS)) as served:
        yield served


@pytest.fixture(scope="module")
def hasty(default_tokenizer):
    """Two seconds per docqa request."""
    with serving(default_tokenizer, Settings(docqa_timeout=2)) as served:
        yield served


def upload(url: str, name: str, data: bytes, question: str = "What is this about?", level: int = 1,
           timeout: float = 300) -> requests.Response:
    return requests.post(f"{url}/v1/docqa", files={"file": (name, data)},
                         data={"question": question, "level": str(level)}, timeout=timeout)


def in_background(call) -> tuple[threading.Thread, dict]:
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("response", call()))
    thread.start()
    return thread, result


def wait_for(condition, what: str, limit: float = 120) -> None:
    """Polls until `condition()` holds; the limit only stops a hang."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def long_document() -> bytes:
    from qwen2.eval.data import haystack_text

    return haystack_text()[:190_000].encode()  # ~45 reading chunks, under GUARDED_LIMITS.chars


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


def test_a_parser_failure_is_a_400_naming_the_file(server_url):
    r = upload(server_url, "broken.pdf", b"%PDF-1.7\n garbage that is no pdf", timeout=60)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "file" and error["code"] == "unreadable_document"
    assert error["message"].startswith("broken.pdf: not a readable PDF") and "\n" not in error["message"]


@pytest.mark.parametrize("name, data, refusal", [
    ("page.html", bombs.unclosed_tags(4 * 2**20), "the document is empty"),
    ("strings.pdf", bombs.string_bomb(), "more than 3 s of CPU"),
    ("operators.pdf", bombs.operator_bomb(), "more than 3 s of CPU"),
    ("pages.pdf", bombs.many_pages(GUARDED_LIMITS.pages + 1), "51 pages, over the limit of 50"),
])
def test_a_hostile_upload_gets_a_400_while_health_and_chat_answer(guarded, name, data, refusal):
    url, app = guarded
    thread, result = in_background(lambda: upload(url, name, data))
    answered = 0
    while thread.is_alive():  # everyone else is served while the upload is parsed
        assert requests.get(f"{url}/health", timeout=30).status_code == 200
        assert requests.post(f"{url}/v1/chat/completions", json=HELLO, timeout=60).status_code == 200
        answered += 1
    thread.join()
    r = result["response"]
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "file" and error["message"].startswith(f"{name}: ") and refusal in error["message"]
    if "CPU" in refusal:  # the child ran for 3 CPU seconds at least: others were served meanwhile
        assert answered >= 1
    assert app.state.server.docqa_running == 0


def test_docqa_requests_beyond_the_cap_get_429(guarded):
    url, app = guarded
    thread, result = in_background(lambda: upload(url, "operators.pdf", bombs.operator_bomb()))
    wait_for(lambda: app.state.server.docqa_running == 1, "the first upload to take its slot")
    r = upload(url, "second.txt", b"A short document.", timeout=60)
    assert r.status_code == 429 and r.headers["Retry-After"]
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "rate_limit_error" and error["code"] == "docqa_busy" and "--docqa-concurrency 1" in \
        error["message"]
    thread.join()
    assert result["response"].status_code == 400  # the first one, stopped by its CPU limit
    assert upload(url, "third.txt", b"A short document.", level=1, timeout=300).status_code == 200  # the slot is free


def test_a_client_that_leaves_has_its_engine_work_cancelled(guarded, default_tokenizer):
    url, app = guarded
    engine = app.state.server.engine
    data = long_document()
    chunks = len(Document([Source("long.txt", data.decode())], default_tokenizer).chunks(READING_CHUNK, OVERLAP))
    submitted, cancelled = engine.stats.requests, engine.stats.cancelled["caller"]
    body, boundary = multipart("long.txt", data, "Who founded the city?", level=2)
    conn = http.client.HTTPConnection(urlparse(url).hostname, urlparse(url).port, timeout=60)
    conn.request("POST", "/v1/docqa", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    wait_for(lambda: engine.stats.requests > submitted, "the reading to reach the engine")
    conn.close()  # the client leaves
    wait_for(lambda: app.state.server.docqa_running == 0, "the request to end")
    wait_for(lambda: engine.running == 0 and engine.waiting == 0, "the engine to be idle")
    assert engine.stats.cancelled["caller"] > cancelled
    assert engine.stats.requests - submitted < chunks  # the chunks were not all read


def test_a_docqa_request_past_its_timeout_is_a_408_and_its_work_stops(hasty):
    url, app = hasty
    engine = app.state.server.engine
    cancelled = engine.stats.cancelled["caller"]
    r = upload(url, "long.txt", long_document(), "Who founded the city?", level=2)
    assert r.status_code == 408 and r.json()["error"]["code"] == "timeout" and "--docqa-timeout" in r.text
    wait_for(lambda: app.state.server.docqa_running == 0, "the request to end")
    wait_for(lambda: engine.running == 0 and engine.waiting == 0, "the engine to be idle")
    assert engine.stats.cancelled["caller"] > cancelled


def multipart(name: str, data: bytes, question: str, level: int) -> tuple[bytes, str]:
    """A multipart/form-data body by hand (http.client sends it; requests would wait for the answer)."""
    boundary = "qwen2-test-boundary"
    fields = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
              for k, v in (("question", question), ("level", level))]
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: text/plain\r\n\r\n").encode()
    return b"".join(fields) + head + data + f"\r\n--{boundary}--\r\n".encode(), boundary
