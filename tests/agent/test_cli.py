"""`qwen2 docqa` as a user runs it: bad documents get one line before any model loads; a real needle is found."""

import json
import subprocess
import sys

import pytest

from qwen2.agent.documents import Limits
from tests.agent import bombs


def docqa(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwen2", "docqa", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_bad_documents_fail_with_one_line_each(tmp_path):
    # every kind of bad document is checked in-process in test_documents.py; here, that the CLI prints one line
    (tmp_path / "fake.pdf").write_bytes(b"%PDF-1.4 not really")
    (tmp_path / "folder").mkdir()
    (tmp_path / "ok.txt").write_text("A short document.")
    # bombs go through the same bounded parser as uploads (the limits themselves: test_isolation.py)
    (tmp_path / "pages.pdf").write_bytes(bombs.many_pages(Limits().pages + 1))
    (tmp_path / "tags.html").write_bytes(bombs.unclosed_tags())
    cases = {("fake.pdf",): "not a readable PDF", ("folder",): "no readable document",
             ("ok.txt", "--level", "1,2"): "--level lists 2 levels for 1 questions",
             ("pages.pdf",): f"pages, over the limit of {Limits().pages:,}", ("tags.html",): "the document is empty"}
    for (name, *options), words in cases.items():
        r = docqa(str(tmp_path / name), "what?", *options, timeout=60)
        assert r.returncode == 1, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("qwen2: error: ") and words in lines[0]


@pytest.mark.slow
def test_the_default_model_finds_a_needle_in_20k_tokens_of_wikipedia_at_levels_1_and_2(tmp_path, default_gguf):
    from qwen2.eval.data import haystack_text

    text = haystack_text()[:80000]  # ~19K tokens
    cut = text.find(". ", len(text) * 2 // 3) + 1
    (tmp_path / "wiki.md").write_text(text[:cut] + " The secret passphrase for the vault is falcon-4821." + text[cut:])
    question = "What is the secret passphrase for the vault?"
    r = docqa(str(tmp_path / "wiki.md"), question, question, "--level", "1,2", "--budget", "2048", "--json",
              "--model", str(default_gguf))
    assert r.returncode == 0, r.stderr
    results = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["level"] for x in results] == [1, 2] and all(x["question"] == question for x in results)
    for result in results:
        assert "falcon-4821" in result["answer"]
        assert any("falcon-4821" in e["quote"] for e in result["evidence"])
        assert result["document_tokens"] > 18000
    assert results[1]["chunks_read"] >= 19
