"""How the agent reaches the model: many prompts at once, through one continuous-batching engine.

`EngineRunner` drives `llm.engine` itself (the CLI and the Python API): it submits every prompt,
steps the engine until all have finished and ticks a progress callback per finished prompt.
`AsyncEngineRunner` is for code running in a worker thread beside a server whose engine thread
already steps the engine: it hands the prompts to the server's AsyncEngine on its event loop,
and `cancel()` (from the loop: client gone, timeout) drops the prompts in flight and makes every
later call raise Cancelled, so the agent's thread stops at its next prompt.
Both render chat messages with the tokenizer's own template (tools included).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable

from qwen2.engine.async_engine import AsyncEngine
from qwen2.engine.llm import LLM
from qwen2.engine.sampling import SamplingParams
from qwen2.tokenizer import Tokenizer

IN_FLIGHT = 16  # prompts handed to a server's engine at a time, well under its waiting-queue bound
Progress = Callable[[int], None]  # called with the number of prompts just finished


class Cancelled(Exception):
    """The request the agent works for was cancelled: its prompts are dropped."""


class Runner:
    tokenizer: Tokenizer
    context: int  # tokens a prompt and its reply may take together

    def complete(self, prompts: list[str], params: list[SamplingParams], progress: Progress | None = None) -> list[str]:
        raise NotImplementedError

    def chat(self, conversations: list[list[dict]], params: list[SamplingParams], tools: list[dict] | None = None,
             progress: Progress | None = None, reply_start: str = "") -> list[str]:
        """The assistant's replies; `reply_start` is written for it first (and returned as part of each reply)."""
        prompts = [self.tokenizer.apply_chat_template(m, tools=tools, add_generation_prompt=True) + reply_start
                   for m in conversations]
        return [reply_start + reply for reply in self.complete(prompts, params, progress)]


class EngineRunner(Runner):
    def __init__(self, llm: LLM):
        self.engine, self.tokenizer, self.context = llm.engine, llm.tokenizer, llm.engine.max_seq_len

    def complete(self, prompts: list[str], params: list[SamplingParams], progress: Progress | None = None) -> list[str]:
        done = self.engine.run_all(prompts, params, on_finish=(lambda _i, _text: progress(1)) if progress else None)
        return [text for _, text in done]


class AsyncEngineRunner(Runner):
    def __init__(self, engine: AsyncEngine, tokenizer: Tokenizer, context: int, loop: asyncio.AbstractEventLoop):
        self.engine, self.tokenizer, self.context, self.loop = engine, tokenizer, context, loop
        self.cancelled = False
        self._batches: set[concurrent.futures.Future] = set()  # complete() calls in flight

    def cancel(self) -> None:
        """Drop the prompts in flight (their engine requests are cancelled) and refuse new ones."""
        self.cancelled = True
        for batch in list(self._batches):
            batch.cancel()

    def complete(self, prompts: list[str], params: list[SamplingParams], progress: Progress | None = None) -> list[str]:
        async def one(gate: asyncio.Semaphore, prompt: str, sp: SamplingParams) -> str:
            async with gate:
                text = "".join([out.text async for out in self.engine.generate(prompt, sp)])
            if progress:
                progress(1)
            return text

        async def every() -> list[str]:
            gate = asyncio.Semaphore(IN_FLIGHT)
            return list(await asyncio.gather(*(one(gate, p, sp) for p, sp in zip(prompts, params))))

        if self.cancelled:
            raise Cancelled
        batch = asyncio.run_coroutine_threadsafe(every(), self.loop)
        self._batches.add(batch)
        if self.cancelled:  # cancel() ran between the check and the add
            batch.cancel()
        try:
            return batch.result()
        except concurrent.futures.CancelledError:
            raise Cancelled from None
        finally:
            self._batches.discard(batch)
