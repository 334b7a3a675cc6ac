"""The engine: one generation loop for every front door (CLI, Python API, server, evals).

Scheduling, one `step()` at a time:
- Waiting requests take a free KV slot. A slot keeps the tokens of the last sequence that
  used it, so a new request takes the free slot sharing its longest prefix and skips that
  part of its prefill (prefix caching: a chat's second turn does not recompute the first).
- At most `prefill_chunk` prompt tokens run per step, so long prompts never stall the
  requests that are already decoding; short prompts that arrive together share that
  forward as a padded batch.
- Then every decoding request advances one token in a single batched forward; a greedy
  request decoding alone may instead check a drafted continuation (speculative decoding).
Requests join and leave between steps (continuous batching).

Isolation: whatever goes wrong while serving one request (sampling, a logits processor,
detokenizing, stop matching) ends that request alone with finish_reason "error" and a message;
a failed forward ends the requests of that forward. The step goes on for everyone else.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from qwen2.engine.sampling import SamplingParams, sample, top_logprobs
from qwen2.engine.speculative import DraftModel, PromptLookup
from qwen2.engine.stops import StopMatcher
from qwen2.errors import RequestError
from qwen2.model import KVCache, Transformer
from qwen2.tokenizer import StreamDecoder, Tokenizer

log = logging.getLogger(__name__)


@dataclass
class Output:
    """What one step produced for one request."""

    request_id: int
    token: int | None
    text: str
    finish_reason: str | None = None  # "stop", "length", "cancelled", "error"
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    error: str | None = None  # with finish_reason "error": what failed


@dataclass
class Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    stop_ids: set[int]
    detok: StreamDecoder
    generator: torch.Generator | None
    stops: StopMatcher
    output: list[int] = field(default_factory=list)
    slot: int | None = None
    computed: int = 0  # tokens whose keys/values are in the slot
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache
    held_text: str = ""  # decoded text withheld because it may start a stop string
    drafted: int = 0  # speculative decoding: tokens proposed / accepted
    accepted: int = 0
    finish_reason: str | None = None
    failed_in: str | None = None  # with finish_reason "error": the stage that failed

    @property
    def prefilled(self) -> bool:
        return self.computed >= len(self.prompt)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_slots: int = 4,
                 max_seq_len: int = 8192, prefill_chunk: int = 512,
                 speculator: PromptLookup | DraftModel | None = None):
        self.model, self.tokenizer, self.speculator = model, tokenizer, speculator
        config = model.config
        if not 0 < max_seq_len <= config.context_limit:
            raise ValueError(f"max_seq_len {max_seq_len} is outside 1..{config.context_limit}, the model's limit")
        self.max_seq_len = max_seq_len
        weight = model.model.embed_tokens.weight
        self.cache = KVCache(config, max_slots, self.max_seq_len, dtype=weight.dtype, device=weight.device)
        self.prefill_chunk = prefill_chunk
        self.slot_tokens: list[list[int]] = [[] for _ in range(max_slots)]
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}
        self._ids = itertools.count()

    def kv_budget(self) -> str:
        per_token = self.cache.bytes_per_token()
        total = per_token * self.cache.max_len * self.cache.slots
        return (f"KV cache: {per_token / 1024:.1f} KiB/token x {self.cache.max_len} tokens x "
                f"{self.cache.slots} slots = {total / 2**20:.0f} MiB ({self.cache.k.dtype})")

    # -- requests ----------------------------------------------------------------------
    def submit(self, prompt: str | list[int], params: SamplingParams | None = None) -> Request:
        params = params or SamplingParams()
        params.validate(self.model.config.vocab_size)
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise RequestError("the prompt is empty; give at least one token")
        if len(ids) >= self.max_seq_len:
            raise RequestError(
                f"the prompt has {len(ids)} tokens but the context holds {self.max_seq_len} "
                f"(model limit {self.model.config.context_limit} with its rope scaling); shorten the prompt, "
                "raise the context length (--ctx), or extend it with --rope-scaling yarn:F or --dca CHUNK")
        stop_ids = set() if params.ignore_eos else set(
            self.tokenizer.eos_token_ids if params.stop_token_ids is None else params.stop_token_ids)
        generator = None
        if params.seed is not None:
            generator = torch.Generator().manual_seed(params.seed)
        request = Request(next(self._ids), ids, params, stop_ids, self.tokenizer.stream_decoder(), generator,
                          StopMatcher(params.stop))
        self.waiting.append(request)
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request now; its slot is free for the next step."""
        if request.finish_reason is None:
            request.finish_reason = "cancelled"
        if request in self.waiting:
            self.waiting.remove(request)
        self.running.pop(request.id, None)

    def clear_prefix_cache(self) -> None:
        """Forget what the free slots hold, so the next prompts are computed cold."""
        busy = {r.slot for r in self.running.values()}
        for s in range(self.cache.slots):
            if s not in busy:
                self.slot_tokens[s] = []

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def stream(self, request: Request) -> Iterator[Output]:
        """Run steps until `request` finishes, yielding its outputs (others advance too)."""
        while request.finish_reason is None:
            for out in self.step():
                if out.request_id == request.id:
                    yield out

    # -- scheduling --------------------------------------------------------------------
    def _admit(self) -> None:
        busy = {r.slot for r in self.running.values()}
        while self.waiting and len(busy) < self.cache.slots:
            request = self.waiting.popleft()
            free = [s for s in range(self.cache.slots) if s not in busy]
            slot = max(free, key=lambda s: common_prefix(self.slot_tokens[s], request.prompt))
            # keep at least one prompt token to compute: its logits give the first new token
            reused = min(common_prefix(self.slot_tokens[slot], request.prompt), len(request.prompt) - 1)
            request.slot, request.computed, request.cached_tokens = slot, reused, reused
            self.slot_tokens[slot] = request.prompt[:reused]
            self.running[request.id] = request
            busy.add(slot)

    @torch.inference_mode()
    def step(self) -> list[Output]:
        self._admit()
        outputs = []
        prefills = self._prefill_batch()
        if prefills:
            chunks = [r.prompt[r.computed: r.computed + self.prefill_chunk] for r in prefills]
            logits = self._guarded_forward(prefills, chunks, [r.computed for r in prefills], outputs)
            for r, chunk, row in zip(prefills, chunks, logits if logits is not None else []):
                r.computed += len(chunk)
                self.slot_tokens[r.slot] += chunk
                if r.prefilled:
                    outputs.append(self._accept(r, row))
        prefilling = {r.id for r in prefills}
        decoding = [r for r in self.running.values() if r.prefilled and r.output and r.id not in prefilling]
        if len(decoding) == 1 and self.speculator is not None and decoding[0].params.greedy:
            try:
                outputs += self._speculate(decoding[0])
            except Exception as e:
                outputs.append(self._fail(decoding[0], "speculative_decoding", e))
        elif decoding:
            logits = self._guarded_forward(decoding, [[r.output[-1]] for r in decoding],
                                           [r.computed for r in decoding], outputs)
            for r, row in zip(decoding, logits if logits is not None else []):
                self.slot_tokens[r.slot].append(r.output[-1])
                r.computed += 1
                outputs.append(self._accept(r, row))
        return outputs

    def _guarded_forward(self, requests: list[Request], chunks: list[list[int]], starts: list[int],
                         outputs: list[Output]) -> torch.Tensor | None:
        """The forward's logits, or None after failing its requests (their outputs join `outputs`)."""
        try:
            return self._forward(requests, chunks, starts)
        except Exception as e:
            outputs.extend(self._fail(r, "forward", e) for r in requests)
            return None

    def _prefill_batch(self) -> list[Request]:
        """The requests whose next prompt chunks go through one forward this step.

        Short prompts arriving together share a forward (one weight read instead of one each);
        the padded batch (rows x longest chunk) stays within prefill_chunk tokens, so running
        decodes wait no longer than for one chunk.
        """
        batch, width = [], 0
        for r in self.running.values():
            if r.prefilled:
                continue
            n = min(len(r.prompt) - r.computed, self.prefill_chunk)
            if batch and (len(batch) + 1) * max(width, n) > self.prefill_chunk:
                break
            batch.append(r)
            width = max(width, n)
        return batch

    def _speculate(self, r: Request) -> list[Output]:
        """One target forward over the last token and a drafted continuation; keep the agreeing prefix."""
        room = min(self.max_seq_len - r.computed - 1, r.params.max_tokens - len(r.output))
        draft = self.speculator.propose(r.slot, r.prompt + r.output)[:max(room - 1, 0)]
        chunk = [r.output[-1]] + draft
        logits = self._forward([r], [chunk], [r.computed], every_position=True)[0]
        outputs = []
        for i, row in enumerate(logits):
            self.slot_tokens[r.slot].append(chunk[i])
            r.computed += 1
            outputs.append(self._accept(r, row))
            if r.finish_reason or i == len(draft) or r.output[-1] != draft[i]:
                break
        r.drafted, r.accepted = r.drafted + len(draft), r.accepted + len(outputs) - 1
        return outputs

    def _forward(self, requests: list[Request], chunks: list[list[int]], starts: list[int],
                 every_position: bool = False) -> torch.Tensor:
        """Logits (B, V) at the last token of each request's chunk (right-padded batch), or
        (B, T, V) at every position."""
        device = self.cache.k.device
        T = max(map(len, chunks))
        tokens = torch.zeros(len(chunks), T, dtype=torch.long)
        positions = torch.zeros(len(chunks), T, dtype=torch.long)
        for i, (chunk, start) in enumerate(zip(chunks, starts)):
            tokens[i, :len(chunk)] = torch.tensor(chunk)
            # pads continue the positions; a pad written past a sequence's end is overwritten
            # before that position is ever attended to
            positions[i] = torch.arange(start, start + T).clamp(max=self.max_seq_len - 1)
        last = torch.tensor([len(c) - 1 for c in chunks])
        slots = torch.tensor([r.slot for r in requests])
        return self.model(tokens.to(device), positions.to(device), cache=self.cache, slots=slots.to(device),
                          logits_index=None if every_position else last.to(device)).float().cpu()

    def _accept(self, request: Request, logits: torch.Tensor) -> Output:
        """The request's next token from its logits row, and the text it releases; a failure
        anywhere here ends this request alone."""
        params, stage = request.params, "sampling"
        try:
            token = sample(logits, params, request.prompt, request.output, request.generator)
            request.output.append(token)
            out = Output(request.id, token, "")
            if params.logprobs is not None:
                out.logprob, out.top_logprobs = top_logprobs(logits, token, params.logprobs)
            stage = "detokenizing"
            if token in request.stop_ids:
                out.text = request.held_text + request.detok.flush()
                return self._finish(request, out, "stop")
            piece = request.detok.push(token)
            stage = "stop_matching"
            out.text = self._release_text(request, piece)
            if request.finish_reason == "stop":
                return self._finish(request, out, "stop")
            full = len(request.prompt) + len(request.output) >= self.max_seq_len
            if len(request.output) >= params.max_tokens or full:
                stage = "detokenizing"
                out.text += request.held_text + request.detok.flush()
                return self._finish(request, out, "length")
            return out
        except Exception as e:
            return self._fail(request, stage, e)

    def _release_text(self, request: Request, piece: str) -> str:
        """Text safe to show: cut at a stop string; hold back a tail that may begin one."""
        text = request.held_text + piece
        start = request.stops.feed(piece)
        if start is not None:
            request.held_text, request.finish_reason = "", "stop"
            return text[: len(text) - len(piece) + start]
        hold = request.stops.partial
        request.held_text = text[len(text) - hold:] if hold else ""
        return text[: len(text) - hold]

    def _fail(self, request: Request, stage: str, error: Exception) -> Output:
        """End one request with finish_reason "error"; its slot's cached tokens are forgotten."""
        log.error("request %d failed in %s", request.id, stage, exc_info=error)
        request.failed_in = stage
        if request.slot is not None:
            self.slot_tokens[request.slot] = []
        message = f"generation failed in {stage.replace('_', ' ')}: {type(error).__name__}: {error}"
        out = Output(request.id, None, "", error=message[:500])
        return self._finish(request, out, "error")

    def _finish(self, request: Request, out: Output, reason: str) -> Output:
        request.finish_reason = out.finish_reason = reason
        request.held_text = ""
        self.running.pop(request.id, None)
        return out
