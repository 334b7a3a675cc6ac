"""Turning one row of logits into the next token.

Order, as in HF and vLLM: logits processors (constrained decoding) -> logit bias ->
repetition / presence / frequency penalties -> temperature -> top-k -> top-p -> min-p ->
draw. Temperature 0 is greedy and ignores the filters. Each request owns a torch.Generator,
so a seed reproduces its text whatever else shares the batch.

`sample` works on one row on the host. `sample_rows` draws a batch's tokens where its logits
are (the GPU), so only token ids cross to the host; it covers requests without logits processors
or logprobs and makes the same draws as `sample` given the same generator on the same device.
A CUDA generator's stream differs from a CPU one's: a seed reproduces its text on one kind of
device, not across kinds.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from qwen2.errors import RequestError

MIN_TEMPERATURE = 1e-3  # logits / temperature stays finite in float32 above it
MAX_STOP_STRINGS, MAX_STOP_LENGTH = 16, 1000


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] | None = None  # None: the model's own end ids
    ignore_eos: bool = False
    logprobs: int | None = None  # top-n alternatives to report with each token
    prompt_logprobs: int | None = None  # score the prompt's tokens too, with top-n alternatives
    # (generated ids so far, float32 logits row) -> logits; e.g. a grammar masking tokens
    logits_processors: list[Callable[[list[int], torch.Tensor], torch.Tensor]] = field(default_factory=list)

    def validate(self, vocab_size: int) -> None:
        """Every field within a range where sampling stays finite (NaN fails every check):
        temperature 0 (greedy) or 0.001..100; repetition_penalty 0.01..100; logit_bias at most
        300 entries, values -100..100; at most 16 stop strings of up to 1000 characters; at most 64
        stop_token_ids; top_p in (0, 1], min_p in [0, 1], presence/frequency penalties in [-2, 2],
        logprobs and prompt_logprobs 0..20, seed in [0, 2**63); max_tokens 0 only with
        prompt_logprobs (the prompt is scored, nothing is sampled)."""
        checks = [
            (self.max_tokens >= 1 or self.max_tokens == 0 and self.prompt_logprobs is not None,
             "max_tokens must be at least 1 (0 only with prompt_logprobs)"),
            (self.temperature == 0 or MIN_TEMPERATURE <= self.temperature <= 100,
             f"temperature must be 0 (greedy) or between {MIN_TEMPERATURE} and 100"),
            (self.top_k >= 0, "top_k must be >= 0 (0 disables it)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (0.01 <= self.repetition_penalty <= 100, "repetition_penalty must be between 0.01 and 100 (1 disables it)"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (len(self.logit_bias) <= 300, "logit_bias takes at most 300 tokens"),
            (all(0 <= t < vocab_size for t in self.logit_bias), f"logit_bias ids must be in [0, {vocab_size})"),
            (all(-100 <= b <= 100 for b in self.logit_bias.values()), "logit_bias values must be in [-100, 100]"),
            (self.seed is None or 0 <= self.seed < 2**63, "seed must be in [0, 2**63)"),
            (len(self.stop) <= MAX_STOP_STRINGS and all(0 < len(s) <= MAX_STOP_LENGTH for s in self.stop),
             f"give at most {MAX_STOP_STRINGS} stop strings, each of 1 to {MAX_STOP_LENGTH} characters"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be between 0 and 20"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
             "prompt_logprobs must be between 0 and 20"),
            (self.stop_token_ids is None or len(self.stop_token_ids) <= 64
             and all(0 <= t < vocab_size for t in self.stop_token_ids),
             f"give at most 64 stop_token_ids, each in [0, {vocab_size})"),
        ]
        for ok, message in checks:
            if not ok:
                raise RequestError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt: list[int],
                    output: list[int]) -> torch.Tensor:
    """Bias and penalties on one row of float32 logits (modified in place, also returned)."""
    penalize_rows(logits[None], [params], [(prompt, output)])
    return logits


def penalize_rows(logits: torch.Tensor, params: list[SamplingParams],
                  histories: list[tuple[list[int], list[int]]]) -> tuple[tuple[torch.Tensor, torch.Tensor],
                                                                         torch.Tensor] | None:
    """Each request's bias, then its repetition penalty, then its presence and frequency penalties, on its
    row of float32 logits (B, V), in place: one gather and one scatter per kind for the whole batch (per
    row, ~8 small ops each cost ~2 ms of a 32-row decode step). Returns where the logits changed and what
    they held before, for `sample_rows` to put back (None: nothing changed)."""
    bias_rows, bias_ids, biases = [], [], []
    seen_rows, seen_ids, repetition = [], [], []
    count_rows, count_ids, counts, presence, frequency = [], [], [], [], []
    for i, (p, (prompt, output)) in enumerate(zip(params, histories)):
        bias_rows += [i] * len(p.logit_bias)
        bias_ids += p.logit_bias
        biases += p.logit_bias.values()
        if p.repetition_penalty != 1.0:
            ids = set(prompt).union(output)
            seen_rows += [i] * len(ids)
            seen_ids += ids
            repetition += [p.repetition_penalty] * len(ids)
        if p.presence_penalty or p.frequency_penalty:
            n = Counter(output)
            count_rows += [i] * len(n)
            count_ids += n
            counts += n.values()
            presence += [p.presence_penalty] * len(n)
            frequency += [p.frequency_penalty] * len(n)
    if not (bias_rows or seen_rows or count_rows):
        return None
    device = logits.device
    rows = torch.tensor(bias_rows + seen_rows + count_rows, device=device)
    ids = torch.tensor(bias_ids + seen_ids + count_ids, device=device)
    kept = logits[rows, ids]

    def values(numbers: list[float]) -> torch.Tensor:
        return torch.tensor(numbers, dtype=logits.dtype, device=device)

    b, r = len(bias_rows), len(bias_rows) + len(seen_rows)
    try:
        if biases:
            logits[rows[:b], ids[:b]] += values(biases)
        if repetition:
            where, penalty = (rows[b:r], ids[b:r]), values(repetition)
            scores = logits[where]
            logits[where] = torch.where(scores > 0, scores / penalty, scores * penalty)
        if counts:
            logits[rows[r:], ids[r:]] -= values(presence) + values(frequency) * values(counts)
    except BaseException:
        logits[rows, ids] = kept
        raise
    return (rows, ids), kept


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p as -inf masks on one row."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p; the first always stays
        drop = probs.cumsum(-1) - probs >= params.top_p
        # a scatter, not indexing by the mask: no host sync when the row is on the GPU
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    if params.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, prompt: list[int], output: list[int],
           generator: torch.Generator | None) -> int:
    """Next token from one row of logits (V,)."""
    logits = logits.float().clone()
    for process in params.logits_processors:
        logits = process(output, logits)
    logits = apply_penalties(logits, params, prompt, output)
    if params.greedy:
        return int(logits.max(-1).indices)  # argmax's first maximum; torch's CPU argmax is ~3x slower
    probs = filter_logits(logits, params).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def samples_on_device(params: SamplingParams) -> bool:
    """Whether `sample_rows` can draw this request's tokens: it needs no logits processor or logprobs."""
    return not (params.logits_processors or params.logprobs is not None)


def sample_rows(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                histories: list[tuple[list[int], list[int]]],
                argmax_rows: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Next tokens (B,) on the logits' device from float32 rows (B, V) of requests that
    `samples_on_device` accepts, with their (prompt, output) ids: greedy rows in one argmax (`argmax_rows`:
    see greedy_tokens), the others each with its generator. Bias and penalties are applied to the rows in
    place for the draw, as `sample` applies them to its copy, and the logits they changed are put back
    after, so `logits` ends as it began: copying the rows would cost more than the draw (19 MB at 32 rows)."""
    changed = penalize_rows(logits, params, histories)
    try:
        tokens = greedy_tokens(logits, argmax_rows)
        for i, (p, generator) in enumerate(zip(params, generators)):
            if not p.greedy:
                probs = filter_logits(logits[i], p).softmax(-1)
                tokens[i] = torch.multinomial(probs, 1, generator=generator)[0]
    finally:
        if changed is not None:
            logits[changed[0]] = changed[1]
    return tokens


def greedy_tokens(logits: torch.Tensor, argmax_rows: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  ) -> torch.Tensor:
    """Each row's first largest logit, (B, V) -> (B,): by `argmax_rows` (a compiled scan of CPU float32
    rows in parallel, the model's where its loader gave one: torch's max took 1.5-2.5 ms at 32 rows), else
    by torch's max, whose indices are the same first maximum as argmax, which torch's CPU build finds ~3x
    slower."""
    if argmax_rows is not None and logits.device.type == "cpu" and logits.dtype == torch.float32:
        return argmax_rows(logits)
    return logits.max(-1).indices


def top_logprobs(logits: torch.Tensor, token: int, n: int) -> tuple[float, list[tuple[int, float]]]:
    """Log-probability of `token` under the model's distribution, and the n most likely."""
    logp = logits.float().log_softmax(-1)
    values, ids = torch.topk(logp, n) if n else (logp[:0], logp[:0].long())
    return float(logp[token]), list(zip(ids.tolist(), values.tolist()))
