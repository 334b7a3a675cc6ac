"""POST /v1/docqa: the document agent behind the server, over an uploaded document.

A multipart form: `file` (the document: text, Markdown, HTML or PDF), `question`, and optionally
`level` (1, 2 or 3; default 2) and `budget` (tokens of document text per answer). The reply is the
answer as JSON: `answer`, `evidence` (source, chunk, start, quote), `level`, `chunks_read`,
`rounds`, `steps`, `document_tokens`, `seconds`. The agent's prompts go through the server's own
engine beside chat requests; the server's body limit (--max-body) caps the upload.

```
curl -F file=@book.pdf -F question="Who hid the key?" -F level=2 http://127.0.0.1:8000/v1/docqa
```

Mounted by the app with `app.include_router(docqa_router())`. Not covered: streaming progress,
keeping a document between requests.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from qwen2.agent import DEFAULT_BUDGET
from qwen2.agent.docqa import DocQA
from qwen2.agent.documents import read_file
from qwen2.agent.runner import AsyncEngineRunner
from qwen2.errors import OptionError


def docqa_router() -> APIRouter:
    router = APIRouter()

    @router.post("/v1/docqa")
    async def docqa(request: Request, file: Annotated[UploadFile, File()], question: Annotated[str, Form()],
                    level: Annotated[int, Form()] = 2, budget: Annotated[int | None, Form()] = None) -> dict:
        server = request.app.state.server
        name = Path(file.filename or "upload.txt").name
        data = await file.read()
        runner = AsyncEngineRunner(server.engine, server.tokenizer, server.context, asyncio.get_running_loop())
        budget = budget or min(DEFAULT_BUDGET, server.context - 1024)
        if budget < 1:
            raise OptionError(f"budget must be a positive token count, got {budget}")

        def answer() -> dict:
            qa = DocQA(runner, budget=budget)
            return qa.ask([read_file(Path(name), data)], question, level=level).to_dict()

        return await run_in_threadpool(answer)

    return router
