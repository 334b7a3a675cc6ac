"""The web chat page in headless Chromium, driven over the DevTools protocol (`websockets`).

Plain CDP needs no driver binary and no browser download: only Debian's chromium, which the
`chromium` fixture installs with apt-get when it is missing (CI runs as root).
"""

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request

import pytest

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
         "--disable-background-networking", "--disable-component-update", "--remote-debugging-port=0"]


@pytest.fixture(scope="session")
def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None and shutil.which("apt-get") and os.geteuid() == 0:
        install = ["apt-get", "install", "-y", "-q", "chromium"]
        if subprocess.run(install, capture_output=True, timeout=900).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=900)  # no package lists yet
            subprocess.run(install, capture_output=True, timeout=900)
        path = shutil.which("chromium")
    if path is None:
        pytest.skip("chromium is not installed and could not be installed (apt-get install chromium)")
    return path


class Page:
    """One browser tab: navigate, evaluate JavaScript, wait for a condition."""

    def __init__(self, ws):
        self.ws, self.last_id = ws, 0

    def call(self, method: str, **params) -> dict:
        self.last_id += 1
        self.ws.send(json.dumps({"id": self.last_id, "method": method, "params": params}))
        while True:  # skip events until our answer
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == self.last_id:
                assert "error" not in message, message["error"]
                return message["result"]

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait(self, expression: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while not (value := self.js(expression)):
            assert time.monotonic() < deadline, f"timed out waiting for {expression}"
            time.sleep(0.1)
        return value

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        self.wait(f"location.href.startsWith({json.dumps(url)}) && document.readyState === 'complete'")

    def send(self, text: str) -> None:
        self.js(f"document.querySelector('#input').value = {json.dumps(text)}; "
                "document.querySelector('#send').click()")


@pytest.fixture(scope="module")
def page(chromium_path, tmp_path_factory):
    from websockets.sync.client import connect

    profile = tmp_path_factory.mktemp("chromium")
    browser = subprocess.Popen([chromium_path, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in browser.stderr:  # "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/..."
            if match := re.search(r"ws://127\.0\.0\.1:(\d+)/", line):
                break
        else:
            pytest.fail("chromium did not start its DevTools server")
        with urllib.request.urlopen(f"http://127.0.0.1:{match[1]}/json/list", timeout=10) as r:
            target = next(t for t in json.load(r) if t["type"] == "page")
        with connect(target["webSocketDebuggerUrl"], max_size=None) as ws:
            yield Page(ws)
    finally:
        browser.terminate()
        browser.wait(timeout=10)


def test_markdown_renderer(page, tiny_server):
    page.open(tiny_server.url + "/")
    html = page.js(r"markdown('Hi **bold** and *it* `a<b`\n\n```py\nx = 1 < 2\n```\n- one\n- two\n\n1. first')")
    assert "<p>Hi <b>bold</b> and <i>it</i> <code>a&lt;b</code></p>" in html
    assert "<pre><code>x = 1 &lt; 2</code></pre>" in html
    assert "<ul><li>one</li><li>two</li></ul>" in html and "<ol><li>first</li></ol>" in html
    assert page.js("markdown('<img src=x onerror=alert(1)>')") == "<p>&lt;img src=x onerror=alert(1)&gt;</p>"


def test_chat_streams_a_reply_and_can_stop_it(page, tiny_server):
    page.open(tiny_server.url + "/")
    page.send("Hello!")
    page.wait("document.querySelector('.assistant').textContent.length > 0")
    assert page.js("document.querySelector('.user').textContent") == "Hello!"
    assert not page.js("document.querySelector('#stop').hidden")
    page.js("document.querySelector('#stop').click()")  # the tiny model would go on for 1024 tokens
    page.wait("document.querySelector('.assistant').dataset.done === '1'")
    assert page.js("document.querySelector('#stop').hidden")
    deadline = time.monotonic() + 10  # the aborted fetch closed the stream: the slot is free
    while tiny_server.metrics()["qwen2_requests_running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert tiny_server.metrics()["qwen2_requests_running"] == 0


def test_the_api_key_field(page, strict_server):
    page.open(strict_server.url + "/")
    page.send("Hello!")
    page.wait("document.querySelector('.assistant').dataset.done === '1'")
    assert "API key" in page.js("document.querySelector('.assistant .error').textContent")
    page.js(f"document.querySelector('#key').value = {json.dumps(strict_server.api_key)}")
    page.send("Hello again!")
    page.wait("document.querySelectorAll('.assistant')[1].dataset.done === '1'")
    # the server's 1.5 s timeout may end the reply early, but text came through first
    assert page.js("document.querySelectorAll('.assistant')[1].textContent.length") > 0
    assert "API key" not in page.js("document.querySelectorAll('.assistant')[1].textContent")
