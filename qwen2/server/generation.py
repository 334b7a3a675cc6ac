"""Running one HTTP request's choices on the shared engine: start them all, then merge their streams.

Starting is separate from streaming so that a full queue or a bad request is an HTTP status
before the first byte of a stream. Leaving the stream early (client gone, timeout) cancels every
choice still running, so their slots are free for the next engine step.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from qwen2.engine.async_engine import AsyncEngine
from qwen2.engine.engine import Output, Request
from qwen2.engine.sampling import SamplingParams


@dataclass
class Choice:
    """One sequence of a response (n per prompt), filled in as its outputs arrive."""

    index: int
    prompt: list[int]
    params: SamplingParams
    adapter: str | None = None  # the LoRA adapter the request's `model` names (None: the base model)
    request: Request | None = None
    outputs: asyncio.Queue | None = None
    text: str = ""
    logprobs: list[Output] = field(default_factory=list)  # outputs that carry a logprob
    finish_reason: str | None = None
    error: str | None = None  # with finish_reason "error"

    def add(self, out: Output) -> None:
        self.text += out.text
        if out.logprob is not None:
            self.logprobs.append(out)
        self.finish_reason, self.error = out.finish_reason, out.error

    @property
    def completion_tokens(self) -> int:
        return len(self.request.output) if self.request else 0


async def start(engine: AsyncEngine, choices: list[Choice]) -> None:
    """Submit every choice, or none: if one is refused (queue full), the others are cancelled."""
    try:
        for c in choices:
            c.request, c.outputs = await engine.submit(c.prompt, c.params, c.adapter)
    except BaseException:
        cancel(engine, choices, "refused")
        raise


def cancel(engine: AsyncEngine, choices: list[Choice], reason: str) -> None:
    for c in choices:
        if c.request is not None and c.request.finish_reason is None:
            engine.cancel(c.request, reason)


async def stream(engine: AsyncEngine, choices: list[Choice], deadline: float,
                 on_first: Callable[[], None] = lambda: None) -> AsyncIterator[tuple[Choice, Output]]:
    """(choice, output) as they come, across all choices, until all finish; TimeoutError past
    `deadline` (loop time). `on_first` runs at the first output. Closing the iterator early
    cancels what is still running."""
    loop = asyncio.get_running_loop()
    merged: asyncio.Queue = asyncio.Queue()

    async def forward(c: Choice) -> None:
        while True:
            out = await c.outputs.get()
            merged.put_nowait((c, out))
            if out.finish_reason is not None:
                return

    tasks = [asyncio.create_task(forward(c)) for c in choices]
    # The deadline arrives as an item, not as asyncio.wait_for: Python 3.11's wait_for swallows a
    # cancellation that lands as its awaitable completes, which would keep a gone client's slot busy.
    timer = loop.call_at(deadline, merged.put_nowait, None)
    first, reason = True, "client_gone"
    try:
        while any(c.finish_reason is None for c in choices):
            item = await merged.get()
            if item is None:
                reason = "timeout"
                raise TimeoutError
            c, out = item
            if first:
                on_first()
                first = False
            c.add(out)
            yield c, out
    finally:
        timer.cancel()
        for t in tasks:
            t.cancel()
        cancel(engine, choices, reason)
