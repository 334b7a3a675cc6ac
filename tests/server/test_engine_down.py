"""While the engine is down, /health says so and requests get a 503, not a hang.

A stopped engine cannot be provoked through a real server's API, so this drives the app
in-process (FastAPI's TestClient, no socket) with the tiny model and stops its engine directly.
"""

from fastapi.testclient import TestClient

from qwen2.engine.engine import Engine
from qwen2.engine.llm import LLM
from qwen2.server.app import Settings, create_app


def test_health_is_503_and_requests_are_refused_while_the_engine_is_down(tiny_model, default_tokenizer):
    llm = LLM(tiny_model, default_tokenizer, Engine(tiny_model, default_tokenizer, max_concurrency=1, max_seq_len=64))
    app = create_app(llm, Settings(model_name="tiny"))
    with TestClient(app, base_url="http://127.0.0.1") as client:  # a loopback Host, as the server wants
        assert client.get("/health").status_code == 200
        assert "qwen2_engine_up 1" in client.get("/metrics").text
        app.state.server.engine.shutdown()
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "engine down"
        r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
        assert "qwen2_engine_up 0" in client.get("/metrics").text
