"""The engine: one generation loop for every front door (CLI, Python API, server, evals).

Memory: one paged KV cache (qwen2.model.PagedKVCache) shared by all sequences, sized by a
byte budget; a sequence holds blocks for the positions it has computed, so any mix of short
and long sequences up to the context length fits as long as their tokens do. `max_concurrency`
caps the sequences running at once, not memory. Full blocks are shared through the prefix
cache (qwen2.engine.paged): a prompt's cached blocks, from live or finished sequences, are
not computed again (a chat's second turn, a system prompt common to many requests).

Scheduling, one `step()` at a time, with a token budget of `prefill_chunk` per step:
- Waiting requests are admitted in order while a sequence row is free and the blocks their
  prompts still need are free too (blocks promised to admitted prompts count as taken).
- Every decoding request gets a block for its next token; when none is left, the newest
  running request is preempted: its blocks go back (its full blocks stay in the prefix
  cache), it returns to the head of the queue and is recomputed on readmission, then goes
  on exactly where it stopped (nothing sampled twice, nothing lost).
- Prompt chunks fill what the decodes leave of the budget, as one padded batch, so a long
  prompt never stalls the streams already running; a prompt waits a step rather than compute
  a block that an earlier prompt in the same batch is computing (it reuses it instead).
- Then every decoding request advances one token in a single batched forward; a greedy
  request decoding alone may instead check a drafted continuation (speculative decoding).
  On CUDA that forward has fixed shapes and replays a CUDA graph (qwen2.engine.cuda_graphs),
  and the tokens of requests that need nothing but the logits are drawn on the device: only
  their ids reach the host. Prompt chunks run eagerly.
- A request that asks for its prompt's log-probabilities (prompt_logprobs) gets them from its
  prompt chunks' logits at every position, scored chunk by chunk; it reuses no cached block (a
  cached block kept no logits) but registers its own for others. With max_tokens 0 it ends
  after its prefill, sampling nothing.
Requests join and leave between steps (continuous batching). A request may name a LoRA adapter
(qwen2.engine.lora): its rows get the adapter's delta in the same forward as everyone else's,
and its prefix-cache blocks are its adapter's own.

Isolation: whatever goes wrong while serving one request (sampling, a logits processor,
detokenizing, stop matching) ends that request alone with finish_reason "error" and a message;
a failed forward ends the requests of that forward. The step goes on for everyone else.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from qwen2.engine.cuda_graphs import StaticDecode, unsupported
from qwen2.engine.lora import AdapterSet
from qwen2.engine.paged import BlockManager, Sequence
from qwen2.engine.sampling import SamplingParams, sample, sample_rows, samples_on_device, top_logprobs
from qwen2.engine.speculative import DraftModel, PromptLookup
from qwen2.engine.stops import StopMatcher
from qwen2.errors import OptionError, RequestError
from qwen2.model import PagedKVCache, Transformer
from qwen2.tokenizer import StreamDecoder, Tokenizer

log = logging.getLogger(__name__)
# Prompt chunks of at most this many tokens in all ride in the decode step's forward (`_can_ride`); longer
# ones take a forward of their own, whose attention is one causal product per chunk.
RIDING_PROMPT_TOKENS = 64

# tokens per KV block: the smallest the usual 16..64 range allows, for the least memory lost to
# partly filled blocks; one gather per layer and step reads a sequence's blocks whatever their size
BLOCK_SIZE = 16
DEFAULT_KV_SHARE = {"cpu": 0.25, "cuda": 0.5}  # default budget: this share of the memory available at start


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
    device_generator: torch.Generator | None = None  # a seeded request's draws on the device
    adapter: int = 0  # its LoRA adapter's number in the engine's AdapterSet (0: the base model)
    output: list[int] = field(default_factory=list)
    slot: int | None = None  # the row of the cache's block tables while running
    seq: Sequence | None = None  # its blocks while running
    computed: int = 0  # tokens whose keys/values are in its blocks
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache
    preemptions: int = 0  # times its blocks were taken back and it was recomputed
    held_text: str = ""  # decoded text withheld because it may start a stop string
    drafted: int = 0  # speculative decoding: tokens proposed / accepted
    accepted: int = 0
    finish_reason: str | None = None
    failed_in: str | None = None  # with finish_reason "error": the stage that failed
    # with params.prompt_logprobs: per prompt token, its logprob and top alternatives (None for the first)
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]] | None] = field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def goal(self) -> int:
        """Tokens to compute before decoding: the prompt, or after a preemption everything but
        the last sampled token (the next decode step feeds that one)."""
        return len(self.prompt) + max(len(self.output) - 1, 0)

    @property
    def prefilled(self) -> bool:
        return self.computed >= self.goal


def default_kv_memory(device: torch.device, share: float | None = None) -> int:
    """`share` (default DEFAULT_KV_SHARE) of the memory available now: free device memory on CUDA,
    MemAvailable on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] * (share or DEFAULT_KV_SHARE["cuda"]))
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return int(available * (share or DEFAULT_KV_SHARE["cpu"]))


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_concurrency: int = 64,
                 max_seq_len: int = 8192, prefill_chunk: int = 512,
                 speculator: PromptLookup | DraftModel | None = None, kv_memory: int | None = None,
                 block_size: int = BLOCK_SIZE, static_decode: bool | None = None,
                 kv_share: float | None = None, adapters: AdapterSet | None = None):
        """kv_memory: bytes for the KV cache
        (default: DEFAULT_KV_SHARE of what is available, no more than max_concurrency full sequences).
        kv_share: instead, this share of what is available, uncapped: for a prefix cache meant to
        outlive its requests (a document read again with another question). Memory is taken only
        as blocks are first written.
        static_decode: decode steps of fixed shape with device sampling (default: on CUDA, for
        the models qwen2.engine.cuda_graphs covers).
        adapters: the LoRA adapters requests may name (submit's `adapter`)."""
        self.model, self.tokenizer, self.speculator = model, tokenizer, speculator
        self.adapters = adapters or AdapterSet(model)
        config = model.config
        if not 0 < max_seq_len <= config.context_limit:
            raise ValueError(f"max_seq_len {max_seq_len} is outside 1..{config.context_limit}, the model's limit")
        self.max_seq_len, self.prefill_chunk = max_seq_len, prefill_chunk
        self.max_concurrency = max_concurrency
        weight = model.model.embed_tokens.weight
        per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * weight.element_size()
        blocks_per_seq = -(-max_seq_len // block_size)
        if kv_memory is None:
            wanted = default_kv_memory(weight.device, kv_share) // (per_token * block_size)
            blocks = max(blocks_per_seq, wanted if kv_share else min(wanted, blocks_per_seq * self.max_concurrency))
        else:
            blocks = kv_memory // (per_token * block_size)
            if blocks < blocks_per_seq:
                raise OptionError(
                    f"a KV cache of {kv_memory / 2**20:.1f} MiB (--kv-memory) holds {blocks * block_size} tokens "
                    f"({per_token / 1024:.1f} KiB each), less than one sequence of {max_seq_len} tokens (--ctx); "
                    f"give --kv-memory at least {blocks_per_seq * block_size * per_token / 2**20:.1f} MiB "
                    "or lower --ctx")
        self.cache = PagedKVCache(config, blocks + 1, block_size, self.max_concurrency, max_seq_len,
                                  dtype=weight.dtype, device=weight.device)
        self.blocks = BlockManager(self.cache)
        if isinstance(model, Transformer):
            model.fuse_weights()  # one GEMM for q/k/v and for gate/up; MoE dispatch without host syncs
        if static_decode is None:
            static_decode = weight.device.type == "cuda" and unsupported(model) is None
        self.static_decode = StaticDecode(model, self.cache) if static_decode else None
        self.free_slots = list(range(self.max_concurrency))
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}  # in admission order: the last is preempted first
        self._ids = itertools.count()

    def kv_budget(self) -> str:
        per_token, blocks, size = self.cache.bytes_per_token(), self.blocks.usable, self.cache.block_size
        return (f"KV cache: {per_token / 1024:.1f} KiB/token x {blocks * size} tokens ({blocks} blocks of {size}) "
                f"= {per_token * blocks * size / 2**20:.0f} MiB ({self.cache.k.dtype}), shared by up to "
                f"{self.max_concurrency} sequences of up to {self.max_seq_len} tokens")

    # -- requests ----------------------------------------------------------------------
    def submit(self, prompt: str | list[int], params: SamplingParams | None = None,
               adapter: str | None = None) -> Request:
        """Queue a request; `adapter`: the name of the LoRA adapter it runs with (None: the base model)."""
        params = params or SamplingParams()
        params.validate(self.model.config.vocab_size)
        adapter_id = self.adapters.id(adapter)
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
                          StopMatcher(params.stop), adapter=adapter_id)
        self.waiting.append(request)
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request now; its blocks are free for the next step."""
        if request.finish_reason is None:
            request.finish_reason = "cancelled"
        if request in self.waiting:
            self.waiting.remove(request)
        if self.running.pop(request.id, None) is not None:
            self._release(request, keep_tail=True)

    def clear_prefix_cache(self) -> None:
        """Forget every cached prefix, so the next prompts are computed cold."""
        self.blocks.clear()

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def stream(self, request: Request) -> Iterator[Output]:
        """Run steps until `request` finishes, yielding its outputs (others advance too)."""
        while request.finish_reason is None:
            for out in self.step():
                if out.request_id == request.id:
                    yield out

    def run_all(self, prompts: list[str | list[int]], params: list[SamplingParams],
                on_finish: Callable[[int, str], None] | None = None,
                on_step: Callable[[list[Output]], None] | None = None) -> list[tuple[Request, str]]:
        """Submit every prompt, step until all have finished, and return each request with its
        text, in the prompts' order: the batch call every caller shares. `on_finish(i, text)` as
        prompt i finishes; `on_step(outputs)` after each step. An interrupt (or a bad prompt)
        cancels the requests not yet finished, so none keeps holding its slot."""
        requests, texts = [], []
        try:
            for prompt, sp in zip(prompts, params, strict=True):
                requests.append(self.submit(prompt, sp))
                texts.append([])
            index = {r.id: i for i, r in enumerate(requests)}
            pending = len(requests)
            while pending and self.has_work:
                outputs = self.step()
                for out in outputs:
                    i = index.get(out.request_id)
                    if i is None:
                        continue
                    texts[i].append(out.text)
                    if out.finish_reason is not None:
                        pending -= 1
                        if on_finish:
                            on_finish(i, "".join(texts[i]))
                if on_step:
                    on_step(outputs)
        finally:
            for r in requests:
                self.cancel(r)
        return [(r, "".join(t)) for r, t in zip(requests, texts)]

    # -- scheduling --------------------------------------------------------------------
    def _admit(self) -> None:
        promised = sum(self._blocks_to_prefill(r) for r in self.running.values() if not r.prefilled)
        while self.waiting and self.free_slots and self.blocks.free > promised:
            request = self.waiting[0]
            seq, reused = self.blocks.match(request.tokens, self._reusable(request), request.adapter)
            request.seq, request.computed = seq, reused
            need = self._blocks_to_prefill(request)
            if need + promised > self.blocks.free:
                self.blocks.release(seq.blocks)
                request.seq, request.computed = None, 0
                return
            self.waiting.popleft()
            promised += need
            if not request.output:
                request.cached_tokens = reused
            request.slot = self.free_slots.pop()
            self.blocks.write_table(seq, request.slot)
            self.running[request.id] = request

    def _reusable(self, r: Request) -> int:
        """Tokens r may take from the prefix cache: a fresh prompt keeps one token to compute (its
        logits give the first new token), or all of them when its prompt is to be scored (a cached
        block has no logits)."""
        if r.output:
            return r.goal
        return 0 if r.params.prompt_logprobs is not None else len(r.prompt) - 1

    def _blocks_to_prefill(self, r: Request) -> int:
        """Blocks r still needs for its prompt and first decoded token."""
        return max(self.blocks.blocks_for(r.goal + 1) - len(r.seq.blocks), 0)

    def _preempt(self, r: Request) -> None:
        """Take r's blocks back; it waits at the head of the queue and is recomputed on readmission."""
        log.info("request %d preempted after %d tokens: the KV cache is full", r.id, r.computed)
        self.running.pop(r.id)
        self._release(r, keep_tail=True)
        r.computed, r.preemptions = 0, r.preemptions + 1
        self.waiting.appendleft(r)

    def _release(self, r: Request, keep_tail: bool) -> None:
        if r.seq is None:
            return
        if keep_tail:
            self.blocks.register_tail(r.seq, r.tokens, r.computed)
        self.blocks.release(r.seq.blocks)
        self.cache.tables[r.slot].zero_()
        self.free_slots.append(r.slot)
        r.seq, r.slot = None, None

    def _reserve(self, r: Request, tokens: int) -> bool:
        """Blocks for r's first `tokens` positions, preempting the newest requests for them; False
        when r itself had to go."""
        if self.blocks.blocks_for(tokens) <= len(r.seq.blocks):
            return True  # its block table is current: rewriting it every decode step costs device copies
        while not self.blocks.grow(r.seq, tokens, r.slot):
            victim = next(reversed(self.running.values()))
            self._preempt(victim)
            if victim is r:
                return False
        return True

    @torch.inference_mode()
    def step(self) -> list[Output]:
        self._admit()
        outputs = []
        decoding = [r for r in self.running.values() if r.prefilled and r.output]
        decoding = [r for r in decoding if r.id in self.running and self._reserve(r, r.computed + 1)]
        decoding = [r for r in decoding if r.id in self.running]  # a later one's reservation may preempt
        size = self.cache.block_size  # whole blocks, so prompts sharing a prefix stay block-aligned
        prefills, chunks = self._prefill_batch(max((self.prefill_chunk - len(decoding)) // size * size, size))
        speculate = len(decoding) == 1 and self.speculator is not None and decoding[0].params.greedy
        riding = bool(prefills and decoding) and not speculate and self._can_ride(prefills, chunks)
        if prefills and not riding:
            scoring = [r.params.prompt_logprobs is not None and not r.output for r in prefills]
            every = any(scoring)  # logits at every position: score prompts, sample from each chunk's last
            logits = self._guarded_forward(prefills, chunks, [r.computed for r in prefills], outputs, every)
            for r, chunk, row, scores in zip(prefills, chunks, logits if logits is not None else [], scoring):
                if scores and not self._score_prompt(r, row[:len(chunk)], outputs):
                    continue
                self._chunk_done(r, chunk, row[len(chunk) - 1] if every else row, outputs)
        if speculate:
            try:
                outputs += self._speculate(decoding[0])
            except Exception as e:
                outputs.append(self._fail(decoding[0], "speculative_decoding", e))
        elif decoding:
            riders = (prefills, chunks) if riding else ([], [])
            rows = self._decode(decoding, outputs, *riders)
            for r, (row, token) in zip(decoding, rows):
                r.computed += 1
                if r.computed % self.cache.block_size == 0:  # a block just filled up
                    self.blocks.register(r.seq, r.tokens, r.computed)
                outputs.append(self._accept(r, row, token))
            for r, chunk, (row, _) in zip(*riders, rows[len(decoding):]):
                self._chunk_done(r, chunk, row, outputs)
        if not (prefills or decoding or outputs) and self.running and not any(
                r.prefilled for r in self.running.values()):
            self._preempt(next(reversed(self.running.values())))  # every prompt stalled for blocks: make room
        return outputs

    def _chunk_done(self, r: Request, chunk: list[int], row: torch.Tensor | None, outputs: list[Output]) -> None:
        """r's prompt chunk is in the cache: register its blocks; a finished prompt samples its first token
        from `row`, the logits at the chunk's last position."""
        r.computed += len(chunk)
        self.blocks.register(r.seq, r.tokens, r.computed)
        if r.prefilled and not r.output:
            done = r.params.max_tokens == 0
            outputs.append(self._finish(r, Output(r.id, None, ""), "length") if done else self._accept(r, row))

    def _can_ride(self, prefills: list[Request], chunks: list[list[int]]) -> bool:
        """Whether these prompt chunks go through the decode step's forward, a row per token: short chunks
        (the weights are then read once for both, and only each chunk's last row needs the output head),
        on a model whose fused decode layers take such rows, with no adapter and no prompt to score."""
        return (self.model.decode_step is not None and self.static_decode is None
                and sum(map(len, chunks)) <= RIDING_PROMPT_TOKENS
                and not any(r.adapter or (r.params.prompt_logprobs is not None and not r.output) for r in prefills))

    def _guarded_forward(self, requests: list[Request], chunks: list[list[int]], starts: list[int],
                         outputs: list[Output], every_position: bool = False) -> torch.Tensor | None:
        """The forward's logits, or None after failing its requests (their outputs join `outputs`)."""
        try:
            return self._forward(requests, chunks, starts, every_position=every_position)
        except Exception as e:
            outputs.extend(self._fail(r, "forward", e) for r in requests)
            return None

    def _decode(self, requests: list[Request], outputs: list[Output], prefills: list[Request] = (),
                chunks: list[list[int]] = ()) -> list[tuple[torch.Tensor | None, int | None]]:
        """One decode forward, which prompt chunks may ride in (`_can_ride`): per request, then per
        prefill, its logits row on the host, or the token already drawn (with the other such decode
        rows, on the forward's device). Nothing after failing the forward (its requests join `outputs`)."""
        tokens = [[r.output[-1]] for r in requests] + list(chunks)
        starts = [r.computed for r in (*requests, *prefills)]
        try:
            if self.static_decode is None or any(r.adapter for r in requests):  # graphs hold no adapter
                logits = self._forward_rows([*requests, *prefills], tokens, starts)
            else:
                logits = self.static_decode([c[0] for c in tokens], starts, [r.slot for r in requests])
        except Exception as e:
            outputs.extend(self._fail(r, "forward", e) for r in (*requests, *prefills))
            return []
        # rows without logits processors or logprobs are drawn together (greedy ones in one argmax), on
        # the host too: one row at a time copied and scanned 151,936 logits each (6 ms a step at 32 rows)
        rows = [i for i, r in enumerate(requests) if samples_on_device(r.params)]
        drawn = {}
        if rows:
            try:
                chosen = [requests[i] for i in rows]
                # the decode rows come first: a leading run of them is a view, any other choice a copy
                drawn = sample_rows(logits[: len(rows)] if rows[-1] == len(rows) - 1 else logits[rows],
                                    [r.params for r in chosen], [self._device_generator(r) for r in chosen],
                                    [(r.prompt, r.output) for r in chosen], self.model.argmax_rows)
                drawn = dict(zip(rows, drawn.tolist()))
            except Exception:  # the host path samples these rows again and fails only the request at fault
                log.warning("sampling on the device failed; sampling on the host", exc_info=True)
        return [(None, drawn[i]) if i in drawn else (logits[i].cpu(), None) for i in range(len(logits))]

    def _device_generator(self, r: Request) -> torch.Generator | None:
        if r.generator is None or self.cache.k.device.type == "cpu":
            return r.generator
        if r.device_generator is None:
            r.device_generator = torch.Generator(self.cache.k.device).manual_seed(r.params.seed)
        return r.device_generator

    def _prefill_batch(self, budget: int) -> tuple[list[Request], list[list[int]]]:
        """The requests whose next prompt chunks go through one forward this step, and the chunks.

        Short prompts arriving together share a forward (one weight read instead of one each);
        the padded batch (rows x longest chunk) stays within `budget` tokens, so running
        decodes wait no longer than for one chunk.
        """
        batch, chunks, width = [], [], 0
        for r in list(self.running.values()):
            if r.prefilled or r.id not in self.running:
                continue
            gained = self.blocks.extend(r.seq, r.tokens, self._reusable(r), r.computed)
            if gained:  # blocks another request computed meanwhile
                r.computed += gained
                self.blocks.write_table(r.seq, r.slot)
                if not r.output:
                    r.cached_tokens += gained
            if r.prefilled:
                continue
            end = min(r.goal, r.computed + self.prefill_chunk)
            if any(self._computing(other, chunk, r) for other, chunk in zip(batch, chunks)):
                continue  # an earlier prompt computes the same block now: reuse it next step
            n = end - r.computed
            if batch and (len(batch) + 1) * max(width, n) > budget:
                break
            n = min(n, budget)
            if not self.blocks.grow(r.seq, r.computed + n, r.slot):
                continue  # its promised blocks went to decodes; it waits for blocks
            batch.append(r)
            chunks.append(r.tokens[r.computed: r.computed + n])
            width = max(width, n)
        return batch, chunks

    def _score_prompt(self, r: Request, logits: torch.Tensor, outputs: list[Output]) -> bool:
        """Score the prompt tokens that r's chunk predicts from its logits (T, V), one position at a
        time (a (V,) log_softmax each, not (T, V)); False after failing r (its output joins `outputs`)."""
        start = r.computed
        try:
            if start == 0:  # (re)computed from the start, after a preemption too
                r.prompt_logprobs = [None]
            for row, token in zip(logits, r.prompt[start + 1:]):  # the last position predicts a new token
                r.prompt_logprobs.append(top_logprobs(row, token, r.params.prompt_logprobs))
            return True
        except Exception as e:
            outputs.append(self._fail(r, "prompt_logprobs", e))
            return False

    def _computing(self, other: Request, chunk: list[int], r: Request) -> bool:
        """Whether `other`'s chunk computes the block r needs next (same tokens up to its end)."""
        size = self.cache.block_size
        if r.computed % size or not other.computed <= r.computed < other.computed + len(chunk):
            return False
        end = r.computed + size
        return end <= self._reusable(r) and other.adapter == r.adapter and other.tokens[:end] == r.tokens[:end]

    def _speculate(self, r: Request) -> list[Output]:
        """One target forward over the last token and a drafted continuation; keep the agreeing prefix."""
        room = min(self.max_seq_len - r.computed - 1, r.params.max_tokens - len(r.output))
        draft = self.speculator.propose(r.tokens)[:max(room - 1, 0)]
        if not self.blocks.grow(r.seq, r.computed + 1 + len(draft), r.slot):
            draft = []  # no blocks to spare for a guess: a plain decode step (its block is reserved)
        chunk = [r.output[-1]] + draft
        logits = self._forward([r], [chunk], [r.computed], every_position=True)[0]
        outputs = []
        for i, row in enumerate(logits):
            r.computed += 1
            outputs.append(self._accept(r, row))
            if r.finish_reason or i == len(draft) or r.output[-1] != draft[i]:
                break
        if r.seq is not None:
            self.blocks.register(r.seq, r.tokens, r.computed)
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
            # pads continue the positions: they land in the sequence's own unwritten positions or, past
            # its blocks, in the padding block; either is rewritten before it is ever attended to
            positions[i] = torch.arange(start, start + T).clamp(max=self.max_seq_len - 1)
        last = torch.tensor([len(c) - 1 for c in chunks])
        slots = torch.tensor([r.slot for r in requests])
        with self.adapters.applied([r.adapter for r in requests]):
            return self.model(tokens.to(device), positions.to(device), cache=self.cache, slots=slots.to(device),
                              logits_index=None if every_position else last.to(device)).float().cpu()

    def _forward_rows(self, requests: list[Request], chunks: list[list[int]], starts: list[int]) -> torch.Tensor:
        """Logits (B, V) at the last token of each request's chunk, every token a batch row of its own. A row
        attends to its sequence's keys up to its own position, and every row's keys are written first, so
        a prompt chunk's rows see exactly their past, as in a forward of the chunk as one row."""
        device = self.cache.k.device
        tokens = torch.tensor([t for chunk in chunks for t in chunk])
        positions = torch.tensor([p for chunk, start in zip(chunks, starts) for p in range(start, start + len(chunk))])
        slots = torch.tensor([r.slot for r, chunk in zip(requests, chunks) for _ in chunk])
        last = torch.tensor(list(itertools.accumulate(map(len, chunks)))) - 1
        with self.adapters.applied([r.adapter for r, chunk in zip(requests, chunks) for _ in chunk]):
            return self.model(tokens[:, None].to(device), positions[:, None].to(device), cache=self.cache,
                              slots=slots.to(device), logits_index=torch.zeros_like(tokens).to(device),
                              logits_rows=last.to(device)).float().cpu()

    def _accept(self, request: Request, logits: torch.Tensor | None, token: int | None = None) -> Output:
        """The request's next token from its logits row (or the token drawn already), and the text
        it releases; a failure anywhere here ends this request alone."""
        params, stage = request.params, "sampling"
        try:
            if token is None:
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
        """End one request with finish_reason "error"; its unfinished last block is not cached."""
        log.error("request %d failed in %s", request.id, stage, exc_info=error)
        request.failed_in = stage
        if self.running.pop(request.id, None) is not None:
            self._release(request, keep_tail=False)
        message = f"generation failed in {stage.replace('_', ' ')}: {type(error).__name__}: {error}"
        out = Output(request.id, None, "", error=message[:500])
        return self._finish(request, out, "error")

    def _finish(self, request: Request, out: Output, reason: str) -> Output:
        request.finish_reason = out.finish_reason = reason
        request.held_text = ""
        if self.running.pop(request.id, None) is not None:
            self._release(request, keep_tail=True)
        return out
