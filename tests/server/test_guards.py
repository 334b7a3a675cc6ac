"""The server trusts no browser by default: it answers only to the Host names it serves (a DNS-
rebinding page names its own), refuses a cross-site POST (a page may send a form or a text/plain
body to any address without preflight) and reads a body only under the media type its route takes."""

import http.client
import json
from urllib.parse import urlparse

import pytest

from qwen2.server.app import LOOPBACK_HOSTS
from qwen2.server.cli import allowed_hosts
from tests.server.conftest import STRICT_HOST

HELLO = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


def raw(server, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> tuple[int, dict]:
    """An HTTP call with exactly the given headers (no Content-Type unless given)."""
    url = urlparse(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        conn.request(method, path, body=body or None, headers=server.auth | (headers or {}))
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"{}")
    finally:
        conn.close()


def error_code(result: tuple[int, dict], status: int) -> str:
    code, body = result
    assert code == status, body
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]
    return body["error"]["code"]


def port(server) -> int:
    return urlparse(server.url).port


def test_loopback_host_names_are_served(tiny_server):
    for host in (f"127.0.0.1:{port(tiny_server)}", f"localhost:{port(tiny_server)}", f"[::1]:{port(tiny_server)}",
                 "localhost", "LOCALHOST"):
        assert raw(tiny_server, "GET", "/health", headers={"Host": host})[0] == 200, host


def test_another_host_name_is_refused(tiny_server):
    for host in ("evil.example", f"evil.example:{port(tiny_server)}", f"127.0.0.1.evil.example:{port(tiny_server)}",
                 STRICT_HOST, ""):
        assert error_code(raw(tiny_server, "GET", "/v1/models", headers={"Host": host}), 403) == "host_not_allowed"
    body = json.dumps(HELLO).encode()
    refused = raw(tiny_server, "POST", "/v1/chat/completions", body,
                  {"Host": "evil.example", "Content-Type": "application/json"})
    assert error_code(refused, 403) == "host_not_allowed"


def test_allowed_hosts_lists_more_names(strict_server):
    assert raw(strict_server, "GET", "/health", headers={"Host": f"{STRICT_HOST}:{port(strict_server)}"})[0] == 200
    assert raw(strict_server, "GET", "/health", headers={"Host": f"localhost:{port(strict_server)}"})[0] == 200
    assert error_code(raw(strict_server, "GET", "/health", headers={"Host": "evil.example"}), 403) == "host_not_allowed"


def test_which_hosts_a_binding_allows():
    assert allowed_hosts("127.0.0.1", [], LOOPBACK_HOSTS) == LOOPBACK_HOSTS
    assert allowed_hosts("::1", [], LOOPBACK_HOSTS) == LOOPBACK_HOSTS
    assert allowed_hosts("127.0.0.2", [], LOOPBACK_HOSTS) == (*LOOPBACK_HOSTS, "127.0.0.2")
    assert allowed_hosts("0.0.0.0", [], LOOPBACK_HOSTS) is None  # bound beyond loopback: any name, unless listed
    assert allowed_hosts("0.0.0.0", ["a.lan,b.lan:8000", "c.lan"], LOOPBACK_HOSTS) == (
        *LOOPBACK_HOSTS, "a.lan", "b.lan:8000", "c.lan")


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_json_routes_need_a_json_content_type(tiny_server, path):
    body = json.dumps(HELLO | {"prompt": "hi"} if path == "/v1/completions" else HELLO).encode()
    for media in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"Content-Type": media} if media else {}
        assert error_code(raw(tiny_server, "POST", path, body, headers), 415) == "unsupported_media_type", media
    for media in ("application/json", "application/json; charset=utf-8", "Application/JSON"):
        assert raw(tiny_server, "POST", path, body, {"Content-Type": media})[0] == 200, media


def test_docqa_needs_a_multipart_upload(tiny_server):
    body = json.dumps({"file": "text", "question": "what?"}).encode()
    refused = raw(tiny_server, "POST", "/v1/docqa", body, {"Content-Type": "application/json"})
    assert error_code(refused, 415) == "unsupported_media_type"


def test_a_cross_site_post_is_refused(tiny_server):
    body, json_type = json.dumps(HELLO).encode(), {"Content-Type": "application/json"}
    for origin in ("http://evil.example", "null", f"http://localhost:{port(tiny_server) + 1}"):
        refused = raw(tiny_server, "POST", "/v1/chat/completions", body, json_type | {"Origin": origin})
        assert error_code(refused, 403) == "origin_not_allowed", origin
    form = raw(tiny_server, "POST", "/v1/docqa", b"--x--\r\n",
               {"Content-Type": "multipart/form-data; boundary=x", "Origin": "http://evil.example"})
    assert error_code(form, 403) == "origin_not_allowed"
    # the server's own page (same origin), and a GET from anywhere (a browser cannot read it without CORS)
    own = raw(tiny_server, "POST", "/v1/chat/completions", body, json_type | {"Origin": tiny_server.url})
    assert own[0] == 200
    assert raw(tiny_server, "GET", "/health", headers={"Origin": "http://evil.example"})[0] == 200


def test_a_cors_origin_may_post(strict_server):
    body = json.dumps(HELLO).encode()
    allowed = raw(strict_server, "POST", "/v1/chat/completions", body,
                  {"Content-Type": "application/json", "Origin": strict_server.cors_origin})
    assert allowed[0] == 200
