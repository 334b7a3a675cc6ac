"""Documents parsed in a child process: each hostile document ends in one clear error naming the
file, stopped by the limit it ran into (text, pages, memory, CPU, wall time), and the child is
gone afterwards. The CPU limits here are enforced by the kernel (RLIMIT_CPU), so a parser that
does more work than allowed is stopped whatever the machine's speed."""

import asyncio
from pathlib import Path

import pytest

from qwen2.agent import isolation
from qwen2.agent.documents import Limits
from qwen2.agent.isolation import read_bounded, read_upload
from qwen2.errors import OptionError
from tests.agent import bombs


def refusal(name: str, data: bytes, limits: Limits) -> str:
    with pytest.raises(OptionError) as e:
        read_bounded(Path(name), data, limits)
    message = str(e.value)
    assert message.startswith(f"{name}: ") and "\n" not in message and "Traceback" not in message
    return message


def test_a_pdf_is_read_in_the_child_and_its_text_comes_back():
    source = read_bounded(Path("ok.pdf"), bombs.text_pdf(["The lighthouse keeper counts 42 gulls.", "Page two."]))
    assert source.text == "The lighthouse keeper counts 42 gulls.\n\nPage two." and source.name == "ok.pdf"


def test_quadratic_html_parses_in_one_linear_pass():
    # 8 MiB of `<a x`: days for a quadratic parser; within 5 CPU seconds it must finish and find no text
    message = refusal("page.html", bombs.unclosed_tags(), Limits(cpu=5))
    assert "the document is empty" in message


def test_a_stream_bomb_pdf_is_stopped_by_the_text_cap():
    # 40 KB of PDF whose one string decompresses to 40M characters: refused at the 8M-character cap
    data = bombs.string_bomb()
    assert len(data) < 50_000
    message = refusal("bomb.pdf", data, Limits())
    assert f"more than {Limits().chars:,} characters" in message


def test_a_stream_bomb_pdf_is_stopped_by_the_memory_limit():
    message = refusal("bomb.pdf", bombs.string_bomb(), Limits(memory=256 * 2**20))
    assert "more than 256 MiB of memory" in message


def test_a_pdf_that_keeps_the_parser_busy_is_stopped_by_the_cpu_limit():
    message = refusal("busy.pdf", bombs.operator_bomb(), Limits(cpu=2))
    assert "more than 2 s of CPU" in message


def test_a_parser_past_the_wall_deadline_is_killed():
    message = refusal("busy.pdf", bombs.operator_bomb(), Limits(cpu=120, wall=1))
    assert "longer than 1 s" in message


def test_a_pdf_with_thousands_of_pages_is_refused_by_the_page_cap():
    data = bombs.many_pages(Limits().pages + 1)
    message = refusal("pages.pdf", data, Limits())
    assert f"{Limits().pages + 1:,} pages, over the limit of {Limits().pages:,}" in message


def test_plain_text_is_read_in_process_and_capped(monkeypatch):
    spawned = []
    monkeypatch.setattr(isolation.subprocess, "Popen", lambda *a, **k: spawned.append(a))
    assert read_bounded(Path("a.txt"), b"short text").text == "short text"
    with pytest.raises(OptionError, match="more than 100 characters"):
        read_bounded(Path("a.txt"), b"x" * 101, Limits(chars=100))
    assert spawned == []  # a UTF-8 decode needs no child


def test_cancelling_an_upload_kills_its_parser(monkeypatch):
    children = []
    spawn = asyncio.create_subprocess_exec

    async def recorded(*args, **kwargs):
        children.append(await spawn(*args, **kwargs))
        return children[-1]

    monkeypatch.setattr(isolation.asyncio, "create_subprocess_exec", recorded)

    async def scenario():
        task = asyncio.ensure_future(read_upload("busy.pdf", bombs.operator_bomb(), Limits(cpu=120, wall=120)))
        while not children:
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(asyncio.wait_for(scenario(), 60))
    assert len(children) == 1 and children[0].returncode is not None  # killed and reaped, not left running
