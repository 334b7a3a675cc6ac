"""The web chat page (GET /) with a reply that holds a code block, as bench/web_page.png.

    python bench/web_page_screenshot.py [--model PATH] [--out bench/web_page.png]

Starts `python -m qwen2.server` (the default model unless --model) on a free loopback port and a
headless Chromium beside it, driven over the DevTools protocol (`websockets`, as
tests/server/test_page.py does). Two questions go through the page itself, typed into its box and
streamed like a user's, each in its own chat so the sidebar lists both; the second answer's code
block is on screen when the 1200x800 viewport is captured. Greedy sampling: a rerun draws the same
replies (the timings under them differ).
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from websockets.sync.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' browser tab, run from anywhere
from tests.server.test_page import Page  # noqa: E402

QUESTIONS = ["In one sentence: what is a prime number?",
             "Write a short Python function that tells whether a number is prime, with a one-line explanation."]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
         "--disable-background-networking", "--disable-component-update", "--hide-scrollbars",
         "--remote-debugging-port=0"]


def wait_ready(server: subprocess.Popen, url: str) -> None:
    deadline = time.monotonic() + 600
    while True:
        assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)


def screenshot(url: str, out: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "needs chromium (apt-get install chromium)"
    with tempfile.TemporaryDirectory() as profile:
        browser = subprocess.Popen([chromium, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            port = next(m[1] for line in browser.stderr if (m := re.search(r"ws://127\.0\.0\.1:(\d+)/", line)))
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
                target = next(t for t in json.load(r) if t["type"] == "page")
            with connect(target["webSocketDebuggerUrl"], max_size=None) as ws:
                tab = Page(ws)
                tab.call("Emulation.setDeviceMetricsOverride", width=1200, height=800, deviceScaleFactor=1,
                         mobile=False)
                tab.call("Page.navigate", url=url + "/")
                tab.wait("document.readyState === 'complete' && !!document.querySelector('#send')")
                tab.js("document.querySelector('#temperature').value = '0'")
                for i, question in enumerate(QUESTIONS):
                    if i:
                        tab.js("document.querySelector('#new').click()")
                    tab.js(f"document.querySelector('#input').value = {json.dumps(question)}; "
                           "document.querySelector('#send').click()")
                    tab.wait("!document.body.classList.contains('busy')", timeout=600)
                tab.js("document.querySelector('#log').scrollTop = 0")
                png = tab.call("Page.captureScreenshot", format="png")["data"]
        finally:
            browser.terminate()
            browser.wait(timeout=10)
    out.write_bytes(base64.b64decode(png))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a model path for the server (default: the embedded default model)")
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("web_page.png"))
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "qwen2.server", "--port", str(port), *(["--model", args.model] if args.model else [])]
    server = subprocess.Popen(cmd)  # its log goes to the terminal: a slow start (a kernel build) shows why
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(server, url)
        t0 = time.perf_counter()
        screenshot(url, args.out)
        print(f"{args.out} ({args.out.stat().st_size // 1024} KiB) in {time.perf_counter() - t0:.0f} s")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
