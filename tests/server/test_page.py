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
        """Load the page with an empty localStorage: no chats or settings from an earlier test."""
        self.call("Storage.clearDataForOrigin", origin="/".join(url.split("/")[:3]), storageTypes="local_storage")
        self.js("window.stale = true")  # gone once the new document is there
        self.call("Page.navigate", url=url)
        self.wait(f"!window.stale && location.href.startsWith({json.dumps(url)}) && document.readyState === 'complete'")

    def reload(self) -> None:
        self.js("window.stale = true")
        self.call("Page.reload")
        self.wait("!window.stale && document.readyState === 'complete'")

    def send(self, text: str) -> None:
        self.js(f"document.querySelector('#input').value = {json.dumps(text)}; "
                "document.querySelector('#send').click()")

    def idle(self, timeout: float = 60) -> None:
        """Wait until no reply streams (the page sets body.busy synchronously when one starts)."""
        self.wait("!document.body.classList.contains('busy')", timeout)

    def fill(self, **values: str) -> None:
        for name, value in values.items():
            self.js(f"document.querySelector('#{name}').value = {json.dumps(value)}")

    def texts(self, selector: str) -> list[str]:
        return self.js(f"[...document.querySelectorAll({json.dumps(selector)})].map((e) => e.textContent)")

    def click(self, selector: str, text: str | None = None) -> None:
        """Click the first match of `selector` (whose text is `text`, if given)."""
        found = self.js(f"(() => {{ const e = [...document.querySelectorAll({json.dumps(selector)})]"
                        f".find((e) => {json.dumps(text)} === null || e.textContent === {json.dumps(text)}); "
                        "if (e) e.click(); return !!e; })()")
        assert found, f"nothing to click: {selector} {text or ''}"

    def record_requests(self) -> None:
        """Keep the JSON body of every fetch the page makes in `window.sent`."""
        self.js("window.sent = []; { const f = window.fetch; "
                "window.fetch = (url, o) => { if (typeof o.body === 'string') sent.push(JSON.parse(o.body)); "
                "return f(url, o); }; }")


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
    assert '<pre><code>x = <span class="num">1</span> &lt; <span class="num">2</span></code></pre>' in html
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


def test_the_code_highlighter(page, tiny_server):
    page.open(tiny_server.url + "/")
    python = 'def f(x):  # <b>\n    return "<i>" + 0x1F'
    assert page.js(f"highlight({json.dumps(python)}, 'py')") == (
        '<span class="kw">def</span> f(x):  <span class="com"># &lt;b&gt;</span>\n'
        '    <span class="kw">return</span> <span class="str">&quot;&lt;i&gt;&quot;</span> + '
        '<span class="num">0x1F</span>')
    assert page.js("highlight('a // b; /* c */ `d`', 'js')") == (
        'a <span class="com">// b; /* c */ `d`</span>')
    assert page.js("highlight('let s = `a ${b}`; /* c', 'js')") == (
        '<span class="kw">let</span> s = <span class="str">`a ${b}`</span>; <span class="com">/* c</span>')


def test_settings_reach_the_request_and_the_reply_shows_its_speed(page, tiny_server):
    page.open(tiny_server.url + "/")
    page.record_requests()
    page.fill(temperature="1", top_k="", seed="7", max_tokens="6", system="Be brief.")
    page.send("Hello!")
    page.idle()
    sent = page.js("sent[0]")
    assert sent["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    assert (sent["temperature"], sent["seed"], sent["max_tokens"]) == (1, 7, 6)
    assert "top_k" not in sent and "top_p" not in sent  # empty: the server's default, the model's own
    assert sent["stream"] and sent["stream_options"] == {"include_usage": True}
    stats = page.js("document.querySelector('.assistant + .meta').textContent")
    assert re.match(r"TTFT \d+\.\d\d s · \d+\.\d tok/s · 6 tokens", stats), stats

    # the same seed samples the same reply again
    reply = page.texts(".assistant")
    page.click(".assistant + .meta button", "Regenerate")
    page.idle()
    assert page.texts(".assistant") == reply
    assert page.js("sent.length") == 2 and page.js("sent[1].messages") == sent["messages"]


def test_editing_a_message_asks_again_from_there(page, tiny_server):
    page.open(tiny_server.url + "/")
    page.record_requests()
    page.fill(max_tokens="3")
    for text in ("first", "second"):
        page.send(text)
        page.idle()
    assert page.texts(".user") == ["first", "second"]
    page.click(".user + .meta button", "Edit")
    page.js("document.querySelector('.edit').value = 'changed'")
    page.click(".user + .meta button", "Send")
    page.idle()
    assert page.texts(".user") == ["changed"] and len(page.texts(".assistant")) == 1
    assert page.js("sent.at(-1).messages") == [{"role": "user", "content": "changed"}]


def test_conversations_survive_a_reload(page, tiny_server):
    page.open(tiny_server.url + "/")
    page.fill(max_tokens="3")
    page.send("alpha")
    page.idle()
    alpha = page.texts(".assistant")
    page.click("#new")
    assert page.texts(".msg") == []
    page.send("beta")
    page.idle()
    page.reload()
    assert page.texts("#chats .open") == ["beta", "alpha"]  # newest first
    assert page.texts("#chats .current .open") == ["beta"] and page.texts(".user") == ["beta"]
    page.click("#chats .open", "alpha")
    assert page.texts(".user") == ["alpha"] and page.texts(".assistant") == alpha
    page.click("#chats .current .delete")
    assert page.texts("#chats .open") == ["beta"] and page.texts(".user") == ["beta"]
    page.reload()
    assert page.texts("#chats .open") == ["beta"] and page.texts(".user") == ["beta"]


def test_a_document_question_shows_its_evidence(page, tiny_server, tmp_path):
    filler = "The garden has roses and tulips. Rain fell for three days in April. " * 20
    doc = tmp_path / "notes.txt"
    doc.write_text(filler + "The spare key is under the <b>blue</b> mat by the door. " + filler)
    page.open(tiny_server.url + "/")
    root = page.call("DOM.getDocument")["root"]["nodeId"]
    node = page.call("DOM.querySelector", nodeId=root, selector="#doc")["nodeId"]
    page.call("DOM.setFileInputFiles", nodeId=node, files=[str(doc)])  # as if the user picked it
    page.fill(question="Where is the spare key?", level="1")
    page.click("#ask")
    page.idle(timeout=120)
    assert page.texts(".user") == ["[notes.txt] Where is the spare key?"]
    assert "level 1" in page.js("document.querySelector('.assistant + .meta').textContent")
    quotes = page.js("[...document.querySelectorAll('.evidence blockquote')].map((q) => q.firstChild.textContent)")
    # the document's markup is text on the page, never HTML
    assert "The spare key is under the <b>blue</b> mat by the door." in quotes
    assert not page.js("document.querySelector('.evidence b, .evidence blockquote *:not(cite)')")


def test_a_code_block_is_highlighted_and_copied(page, default_server):
    page.open(default_server.url + "/")
    page.fill(temperature="0", max_tokens="80")
    page.send("Write a Python function add(a, b) that returns a + b. Reply with the code block only.")
    page.idle(timeout=120)
    assert page.texts(".assistant pre .kw")[:1] == ["def"] and "return" in page.texts(".assistant pre .kw")
    # headless Chromium refuses the write ("Document is not focused"): the page's call is caught instead
    page.js("navigator.clipboard.writeText = async (text) => { window.copied = text; }")
    page.click(".assistant .copy")
    page.wait("document.querySelector('.assistant .copy').textContent === 'Copied'")
    code = page.js("document.querySelector('.assistant pre').textContent")
    assert page.js("copied") == code and code.startswith("def add(a, b):")
