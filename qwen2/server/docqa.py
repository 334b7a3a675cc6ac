"""POST /v1/docqa: the document agent behind the server, over an uploaded document.

A multipart form: `file` (the document: text, Markdown, HTML or PDF), `question`, and optionally
`level` (1, 2 or 3; default 2) and `budget` (tokens of document text per answer). The reply is the
answer as JSON: `answer`, `evidence` (source, chunk, start, quote), `level`, `chunks_read`,
`rounds`, `steps`, `document_tokens`, `seconds`. The agent's prompts go through the server's own
engine beside chat requests; the server's body limit (--max-body) caps the upload.

```
curl -F file=@book.pdf -F question="Who hid the key?" -F level=2 http://127.0.0.1:8000/v1/docqa
```

An upload is untrusted: HTML and PDF are parsed in a child process under the server's document
limits (qwen2.agent.isolation), and a document the parser refuses or that hits a limit is a 400
naming the file. At most --docqa-concurrency requests run at once (429 beyond, before the body
is read); each has --docqa-timeout seconds (408 after), and when it ends early (timeout, client
gone) its parser is killed and its prompts are cancelled in the engine.

Mounted by the app with `app.include_router(docqa_router())`. Not covered: streaming progress,
keeping a document between requests.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request, Response
from starlette.datastructures import FormData, UploadFile

from qwen2.agent import DEFAULT_BUDGET
from qwen2.agent.docqa import DocQA
from qwen2.agent.isolation import read_upload
from qwen2.agent.runner import AsyncEngineRunner
from qwen2.errors import OptionError
from qwen2.server.protocol import APIError, invalid

if TYPE_CHECKING:
    from qwen2.server.app import Server

FORM_FIELDS = 8  # file, question, level, budget and some slack; more is not a docqa form


class _ClientGone(Exception):
    pass


def docqa_router() -> APIRouter:
    router = APIRouter()

    @router.post("/v1/docqa")
    async def docqa(request: Request) -> Any:
        server: Server = request.app.state.server
        loop = asyncio.get_running_loop()
        deadline = loop.time() + server.settings.docqa_timeout
        with server.docqa_slot():  # a 429 here comes before the upload is read
            form = await request.form(max_files=1, max_fields=FORM_FIELDS)
            upload, question, level, budget = _fields(form, server.context)
            name = Path(upload.filename or "upload.txt").name
            data = await upload.read()
            runner = AsyncEngineRunner(server.engine, server.tokenizer, server.context, loop)
            qa = DocQA(runner, budget=budget)  # a budget the context cannot hold is refused before parsing
            work = asyncio.ensure_future(_answer(server, runner, qa, name, data, question, level))
            try:
                return await _watch(request, work, deadline)
            except TimeoutError:
                raise APIError(408, f"the document question took longer than the server's limit "
                                    f"({server.settings.docqa_timeout:g} s) and was cancelled; ask at level 1, send "
                                    "a shorter document or raise --docqa-timeout", code="timeout") from None
            except _ClientGone:  # nobody waits for the answer: its work is stopped
                return Response(status_code=499)
            finally:
                if not work.done():
                    runner.cancel()
                    work.cancel()
                    await asyncio.wait({work})  # the slot is held until the work has really stopped
                    if not work.cancelled():  # it ended on its own meanwhile: retrieved, so asyncio does not log it
                        work.exception()

    return router


async def _answer(server: Server, runner: AsyncEngineRunner, qa: DocQA, name: str, data: bytes, question: str,
                  level: int) -> dict:
    try:
        source = await read_upload(name, data, server.settings.document_limits)
    except OptionError as e:
        raise APIError(400, str(e), "file", code="unreadable_document") from None
    thread = asyncio.get_running_loop().run_in_executor(None, lambda: qa.ask([source], question, level).to_dict())
    try:
        await asyncio.wait({thread})  # unlike awaiting it, a cancel here leaves the future to the thread
    except asyncio.CancelledError:
        runner.cancel()  # the thread stops at its next prompt; wait for it, so the caller's slot stays held
        await asyncio.wait({thread})
        thread.exception()  # its Cancelled is expected: retrieved, so asyncio does not log it
        raise
    return thread.result()


async def _watch(request: Request, work: asyncio.Future, deadline: float) -> Any:
    """`work`'s result; TimeoutError past the deadline, _ClientGone when the client has left."""
    loop = asyncio.get_running_loop()
    while not work.done():
        left = deadline - loop.time()
        if left <= 0:
            raise TimeoutError
        await asyncio.wait({work}, timeout=min(1.0, left))
        if not work.done() and await request.is_disconnected():
            raise _ClientGone
    return work.result()


def _fields(form: FormData, context: int) -> tuple[UploadFile, str, int, int]:
    upload, question = form.get("file"), form.get("question")
    if not isinstance(upload, UploadFile):
        raise invalid("file: attach the document as the multipart file field 'file'", "file")
    if not isinstance(question, str) or not question.strip():
        raise invalid("question: Field required (the question about the document)", "question")
    level = _integer(form, "level", 2)
    if level not in (1, 2, 3):
        raise invalid(f"level must be 1 (retrieval), 2 (chunk-by-chunk reading) or 3 (multi-hop), got {level}",
                      "level")
    budget = _integer(form, "budget", min(DEFAULT_BUDGET, context - 1024))
    if budget < 1:
        raise invalid(f"budget must be a positive token count, got {budget}", "budget")
    return upload, question, level, budget


def _integer(form: FormData, name: str, default: int) -> int:
    value = form.get(name)
    if value is None or value == "":
        return default
    if not isinstance(value, str) or not value.strip().lstrip("-").isdigit():
        raise invalid(f"{name}: Input should be a valid integer", name)
    return int(value)
