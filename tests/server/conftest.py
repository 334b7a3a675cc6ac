"""Real server processes on loopback (`python -m qwen2.server`), started once per session.

- tiny: a random 2-layer Qwen2 with the real vocabulary, for everything where content does not
  matter (fast); 8 slots, a 16 MiB body cap.
- strict: the same tiny model behind every limit: API key, 1 slot, a queue of 1, a 1.5 s
  timeout, a 64 KiB body cap, CORS for one origin, one Host name besides loopback's.
- default: the embedded default model, where the content matters (tools, JSON schema, chat).
All three start together at the first use, so their start-up costs overlap. One more, started
only by the tests that use it: the default model behind a chat template without tools.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

STRICT_KEY = "test-key-123"
STRICT_ORIGIN = "http://allowed.example"
STRICT_TIMEOUT = 1.5
STRICT_HOST = "box.lan"  # --allowed-hosts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    text: str

    def json(self) -> dict:
        return json.loads(self.text)


@dataclass
class ServerProcess:
    name: str
    process: subprocess.Popen
    url: str
    log: Path
    api_key: str | None = None
    cors_origin: str | None = None
    timeout: float | None = None
    model: Path | None = None  # the checkpoint it serves
    ready: bool = False

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def wait_ready(self, timeout: float = 180) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while not self.ready:
            if self.process.poll() is not None:
                pytest.fail(f"the {self.name} server exited:\n{self.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"the {self.name} server did not answer /health in {timeout} s")
            try:
                self.ready = self.request("GET", "/health", timeout=5).status == 200
            except OSError:
                time.sleep(0.2)
        return self

    def request(self, method: str, path: str, body: dict | bytes | None = None, headers: dict | None = None,
                timeout: float = 60) -> Response:
        """A raw HTTP call (stdlib), for status codes, headers and exact bodies."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return Response(r.status, dict(r.headers), r.read().decode())
        except urllib.error.HTTPError as e:
            return Response(e.code, dict(e.headers), e.read().decode())

    def metrics(self) -> dict[str, float]:
        """The samples of /metrics, by name with its labels (`name{reason="x"}`)."""
        lines = self.request("GET", "/metrics").text.splitlines()
        return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in lines if line and line[0] != "#")}

    def client(self, api_key: str = "unused"):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=120)


def _tiny_checkpoint(folder: Path, tokenizer) -> Path:
    import torch

    from qwen2.config import Qwen2Config
    from qwen2.model import Transformer
    from qwen2.weights.export import export_hf

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         rope_theta=10000.0, tie_word_embeddings=True, eos_token_id=151645)
    model = Transformer(config).eval()
    with torch.no_grad():
        # the default init gives a near-uniform next token, and std 1 one that copies the last
        # token; 0.3 leaves a clear argmax (greedy is stable) with room to sample (entropy ~7)
        model.model.embed_tokens.weight.normal_(0, 0.3)
    export_hf(config, model.state_dict(), tokenizer, folder)
    return folder


def _launch(name: str, model: Path, args: list[str], logs: Path, **settings) -> ServerProcess:
    port = free_port()
    log = logs / f"{name}.log"
    cmd = [sys.executable, "-m", "qwen2.server", "--model", str(model), "--port", str(port), *args]
    env = os.environ | {"QWEN2_API_KEY": ""}  # only the strict server asks for a key
    process = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    return ServerProcess(name, process, f"http://127.0.0.1:{port}", log, model=model, **settings)


@pytest.fixture(scope="session")
def _servers(tmp_path_factory, default_gguf, default_tokenizer):
    root = tmp_path_factory.mktemp("server")
    tiny = _tiny_checkpoint(root / "tiny", default_tokenizer)
    small = ["--ctx", "2048", "--dtype", "float32", "--quant", "none"]  # exact twins for the equality tests
    servers = {
        "tiny": _launch("tiny", tiny, [*small, "--max-concurrency", "8", "--max-body", str(16 * 2**20)], root),
        "strict": _launch("strict", tiny, [*small, "--max-concurrency", "1", "--max-queue", "1",
                                           "--timeout", str(STRICT_TIMEOUT), "--api-key", STRICT_KEY,
                                           "--max-body", "65536", "--cors-origin", STRICT_ORIGIN,
                                           "--allowed-hosts", STRICT_HOST], root,
                          api_key=STRICT_KEY, cors_origin=STRICT_ORIGIN, timeout=STRICT_TIMEOUT),
        "default": _launch("default", default_gguf, ["--ctx", "4096", "--max-concurrency", "4"], root),
    }
    yield servers
    for s in servers.values():
        s.process.terminate()
    for s in servers.values():
        try:
            s.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            s.process.kill()


@pytest.fixture(scope="session")
def plain_template_server(tmp_path_factory, default_gguf):
    """The default model behind Qwen2-Instruct's plain ChatML template (--chat-template): no tools branch."""
    from qwen2.tokenizer import FALLBACK_CHAT_TEMPLATE

    root = tmp_path_factory.mktemp("plain-template")
    template = root / "chatml.jinja"
    template.write_text(FALLBACK_CHAT_TEMPLATE)
    server = _launch("plain-template", default_gguf, ["--ctx", "2048", "--max-concurrency", "2",
                                                       "--chat-template", str(template)], root)
    yield server.wait_ready()
    server.process.terminate()
    server.process.wait(timeout=10)


@pytest.fixture(scope="session")
def tiny_server(_servers) -> ServerProcess:
    return _servers["tiny"].wait_ready()


@pytest.fixture(scope="session")
def strict_server(_servers) -> ServerProcess:
    return _servers["strict"].wait_ready()


@pytest.fixture(scope="session")
def default_server(_servers) -> ServerProcess:
    return _servers["default"].wait_ready()
