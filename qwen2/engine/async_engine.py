"""The asynchronous front door, for the server: submit, stream, cancel.

The Engine is single-threaded by design. One background thread owns it: it takes commands
(submit, cancel, call: other work on the model, such as an embedding forward) from a queue
between steps and hands each Output to the asyncio loop of the request that asked for it.
Nothing else touches the engine, so no locks reach the hot loop.

Supervision: the thread never dies silently. A request that fails (in the engine or while its
output is handed over, e.g. its caller's loop is gone) ends alone; an error outside any one
request fails the requests in flight, is logged, and the loop goes on. When the thread stops
(shutdown, or a failure it cannot survive), every open request gets a final output with
finish_reason "error" and later submits are refused with EngineUnavailableError.

Speed: with libgomp (torch's CPU threads), a thread pool that another long-lived thread
started (say, the main thread loading the model with several threads) makes the engine
thread's workers sleep between parallel regions, ~1.4x the time per token on 2 cores. Load on
a thread that ends, as `qwen2 serve` does (qwen2/server/cli.py), or with one thread.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from qwen2.engine.engine import Engine, Output, Request
from qwen2.engine.sampling import SamplingParams
from qwen2.errors import Qwen2Error, RequestError

log = logging.getLogger(__name__)
T = TypeVar("T")


class QueueFullError(RequestError):
    """More requests are waiting than the engine accepts; retry later."""


class EngineUnavailableError(RequestError):
    """The engine is stopped (shutting down, or its thread has ended); nothing can be served."""


@dataclass
class Stats:
    requests: int = 0
    finished: int = 0
    cancelled: Counter[str] = field(default_factory=Counter)  # by reason: "caller", "client_gone", "timeout", ...
    failed: Counter[str] = field(default_factory=Counter)  # by the stage that failed, or "shutdown"
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    time_to_first_token: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))  # latest


@dataclass
class _Handle:
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue
    submitted: float
    request: Request | None = None
    first_token_at: float | None = None


class AsyncEngine:
    def __init__(self, engine: Engine, max_waiting: int = 64):
        self.engine, self.max_waiting = engine, max_waiting
        self.stats = Stats()
        self._commands: queue.Queue = queue.Queue()
        self._handles: dict[int, _Handle] = {}
        self._thread = threading.Thread(target=self._run, name="qwen2-engine", daemon=True)
        self._stopping = False
        self._closed = False  # set once, by the engine thread as it ends; guarded by _lock
        self._lock = threading.Lock()
        self._pending = 0  # submits not yet taken by the engine thread (asyncio side only)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Whether the engine takes requests (its thread runs and no shutdown was asked for)."""
        return self._thread.is_alive() and not self._stopping and not self._closed

    # -- called from asyncio -----------------------------------------------------------
    @property
    def waiting(self) -> int:
        return len(self.engine.waiting)

    @property
    def running(self) -> int:
        return len(self.engine.running)

    async def submit(self, prompt: str | list[int], params: SamplingParams,
                     adapter: str | None = None) -> tuple[Request, asyncio.Queue]:
        """Queue a request (with the LoRA adapter named `adapter`, if any); returns it with the
        asyncio queue its Outputs will arrive on."""
        # submits still in the command queue count too, or a burst would slip past the bound
        if self.waiting + self._pending >= self.max_waiting:
            raise QueueFullError(f"{self.waiting + self._pending} requests are already waiting; retry shortly")
        loop = asyncio.get_running_loop()
        handle = _Handle(loop, asyncio.Queue(), time.perf_counter())
        accepted: asyncio.Future = loop.create_future()
        self._pending += 1
        try:
            with self._lock:
                if self._closed or self._stopping:
                    raise EngineUnavailableError("the engine is stopped and takes no requests; restart the server")
                self._commands.put(("submit", prompt, params, adapter, handle, accepted))
            request = await accepted
        finally:
            self._pending -= 1
        return request, handle.outputs

    async def generate(self, prompt: str | list[int], params: SamplingParams) -> AsyncIterator[Output]:
        """Stream a request's outputs; closing the iterator early (client gone) cancels it."""
        request, outputs = await self.submit(prompt, params)
        try:
            while True:
                out = await outputs.get()
                yield out
                if out.finish_reason is not None:
                    return
        finally:
            if request.finish_reason is None:
                self.cancel(request)

    async def call(self, work: Callable[[], T]) -> T:
        """Run `work` on the engine thread between two steps and return its result: other uses of
        the model (an embedding forward) take turns with the engine's steps instead of running beside
        them, where they would compete for the same cores and could break a CUDA graph's capture."""
        if self.waiting + self._pending >= self.max_waiting:
            raise QueueFullError(f"{self.waiting + self._pending} requests are already waiting; retry shortly")
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        self._pending += 1
        try:
            with self._lock:
                if self._closed or self._stopping:
                    raise EngineUnavailableError("the engine is stopped and takes no requests; restart the server")
                self._commands.put(("call", work, loop, done))
            return await done
        finally:
            self._pending -= 1

    def cancel(self, request: Request, reason: str = "caller") -> None:
        """Free the request's slot before the next step; `reason` labels it in the stats."""
        self._commands.put(("cancel", request, reason))

    def shutdown(self) -> None:
        """Stop the thread; every open request gets a final output first."""
        self._stopping = True
        self._commands.put(("stop",))
        self._thread.join(timeout=10)

    # -- the engine thread -------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping:
                try:
                    self._drain_commands(block=not self.engine.has_work)
                    if self.engine.has_work:
                        for out in self.engine.step():
                            self._deliver(out)
                except Exception:  # outside any one request: a bug must not leave clients waiting forever
                    log.exception("engine loop failed; failing the requests in flight")
                    self._fail_all("internal", "the engine failed; see the server log")
        finally:
            self._close()

    def _close(self) -> None:
        """The thread is ending: refuse what is queued and end every open request."""
        with self._lock:
            self._closed = True
        try:
            while True:
                command = self._commands.get_nowait()
                stopped = EngineUnavailableError("the engine stopped before this request started")
                if command[0] == "submit":
                    self._call(command[4].loop, self._settle, command[5], None, stopped)
                elif command[0] == "call":
                    self._call(command[2], self._resolve, command[3], None, stopped)
        except queue.Empty:
            pass
        self._fail_all("shutdown", "the server is shutting down; the request was not finished")

    def _drain_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(block=block, timeout=0.5 if block else None)
        except queue.Empty:
            return
        while True:
            self._execute(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _execute(self, command: tuple) -> None:
        kind = command[0]
        if kind == "submit":
            _, prompt, params, adapter, handle, accepted = command
            try:
                request = self.engine.submit(prompt, params, adapter)
            except Exception as e:  # anything else is our bug: log it, but keep the thread alive
                if not isinstance(e, Qwen2Error):
                    log.exception("submit failed")
                self._call(handle.loop, self._settle, accepted, None, e)
                return
            if not self._call(handle.loop, self._settle, accepted, request, None):
                self.engine.cancel(request)  # the caller's loop is gone before it got its request
                self.stats.cancelled["caller_gone"] += 1
                return
            handle.request = request
            self._handles[request.id] = handle
            self.stats.requests += 1
            self.stats.prompt_tokens += len(request.prompt)
        elif kind == "call":
            _, work, loop, done = command
            if done.cancelled():  # its caller is gone: skip the work
                return
            try:
                result, error = work(), None
            except Exception as e:  # the caller's to answer; the engine goes on
                result, error = None, e
            self._call(loop, self._resolve, done, result, error)
        elif kind == "cancel":
            _, request, reason = command
            if request.finish_reason is None:
                self.engine.cancel(request)
                self.stats.cancelled[reason] += 1
                self._handles.pop(request.id, None)

    def _deliver(self, out: Output) -> None:
        handle = self._handles.get(out.request_id)
        if handle is None:
            return
        if out.finish_reason is not None:
            del self._handles[out.request_id]
            if out.finish_reason == "error":
                self.stats.failed[handle.request.failed_in or "internal"] += 1
            else:
                self.stats.finished += 1
        if out.token is not None:
            if handle.first_token_at is None:
                handle.first_token_at = time.perf_counter()
                self.stats.time_to_first_token.append(handle.first_token_at - handle.submitted)
                self.stats.cached_tokens += handle.request.cached_tokens
            self.stats.generated_tokens += 1
        if not self._call(handle.loop, handle.outputs.put_nowait, out) and out.finish_reason is None:
            # nobody can receive it (the caller's event loop is gone): free the slot now
            self.engine.cancel(handle.request)
            self.stats.cancelled["caller_gone"] += 1
            del self._handles[out.request_id]

    def _fail_all(self, reason: str, message: str) -> None:
        for request_id, handle in list(self._handles.items()):
            self.engine.cancel(handle.request)
            self.stats.failed[reason] += 1
            self._call(handle.loop, handle.outputs.put_nowait,
                       Output(request_id, None, "", finish_reason="error", error=message))
        self._handles.clear()

    @staticmethod
    def _call(loop: asyncio.AbstractEventLoop, callback, *args) -> bool:
        """Run `callback` on a caller's loop; False when that loop is closed."""
        try:
            loop.call_soon_threadsafe(callback, *args)
            return True
        except RuntimeError:
            return False

    @staticmethod
    def _resolve(future: asyncio.Future, result: Any, error: Exception | None) -> None:
        """Runs on the caller's loop: answer call()."""
        if future.cancelled():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def _settle(self, future: asyncio.Future, request: Request | None, error: Exception | None) -> None:
        """Runs on the caller's loop: answer submit(), or cancel if the caller gave up meanwhile."""
        if future.cancelled():
            if request is not None:
                self.cancel(request, "caller")
        elif error is not None:
            future.set_exception(error)
        else:
            future.set_result(request)
