"""POST /v1/embeddings, in OpenAI's shape: one unit vector per input (qwen2.embeddings).

Served: `input` (a text, texts, token ids, or lists of token ids), `encoding_format` ("float", or
"base64": little-endian float32, as OpenAI's client decodes it), `dimensions` (the first ones,
renormalised: Matryoshka), `model`; `user` is ignored. Pooling is the server's (--pooling, or the
checkpoint's convention); usage counts the tokens the model read, the appended <|endoftext|> too.

Bounds (a 400 naming the field): at most MAX_INPUTS inputs and MAX_TOKENS tokens in one request,
each input non-empty and within the context.

The forwards run on the engine's thread between its steps (AsyncEngine.call), each of at most a
prefill chunk's worth of padded tokens, so the streams being generated wait no longer for an
embedding request than for another prompt's chunk (a single input longer than a chunk goes in one
forward, without a cache to split it over).
"""

from __future__ import annotations

import asyncio
import base64
import json
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import torch
from fastapi import APIRouter, Request, Response
from pydantic import Field

from qwen2.embeddings import batches, embed, input_ids, shorten
from qwen2.server.protocol import Body, invalid
from qwen2.server.routes import timed_out

if TYPE_CHECKING:
    from qwen2.server.app import Server

MAX_INPUTS = 2048  # OpenAI's limits for one request
MAX_TOKENS = 300_000

router = APIRouter()


class EmbeddingRequest(Body):
    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None

    def inputs(self) -> list[str | list[int]]:
        x = self.input
        items = [x] if isinstance(x, str) or (x and isinstance(x[0], int)) else list(x)
        if not items:
            raise invalid("input is empty; give a text, a list of texts, or token ids", "input")
        if len(items) > MAX_INPUTS:
            raise invalid(f"{len(items)} inputs are more than {MAX_INPUTS} in one request; send fewer", "input")
        return items


@router.post("/v1/embeddings")
async def create_embeddings(body: EmbeddingRequest, http: Request) -> Any:
    server: Server = http.app.state.server
    engine, pooling = server.engine.engine, server.settings.pooling
    hidden = engine.model.config.hidden_size
    if body.dimensions is not None and body.dimensions > hidden:
        raise invalid(f"dimensions is {body.dimensions} but this model's embeddings have {hidden}", "dimensions")
    ids = await server.prepare(_input_ids, server, body)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + server.timeout
    vectors = torch.empty(len(ids), hidden)
    for group in batches([len(x) for x in ids], engine.prefill_chunk):
        if await http.is_disconnected():  # nobody waits for the answer: compute no more
            return Response(status_code=499)
        if loop.time() > deadline:
            raise timed_out(server)
        vectors[group] = await server.engine.call(partial(embed, engine.model, [ids[i] for i in group], pooling))
    # a request's thousands of floats take a while to write out: not on the event loop
    return Response(await server.prepare(_body, server, body, vectors, sum(map(len, ids))),
                    media_type="application/json")


def _input_ids(server: Server, body: EmbeddingRequest) -> list[list[int]]:
    items = body.inputs()
    ids = [input_ids(server.tokenizer, server.prompt_ids(x, f"input[{i}]" if len(items) > 1 else "input"),
                     server.settings.pooling) for i, x in enumerate(items)]
    total = sum(map(len, ids))
    if total > MAX_TOKENS:
        raise invalid(f"the inputs have {total} tokens, more than {MAX_TOKENS} in one request; send fewer", "input")
    return ids


def _body(server: Server, body: EmbeddingRequest, vectors: torch.Tensor, tokens: int) -> bytes:
    vectors = shorten(vectors, body.dimensions)
    if body.encoding_format == "base64":
        encoded = [base64.b64encode(v.numpy().astype("<f4").tobytes()).decode() for v in vectors]
    else:
        encoded = vectors.tolist()
    data = [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(encoded)]
    return json.dumps({"object": "list", "data": data, "model": server.model_name,
                       "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}).encode()
