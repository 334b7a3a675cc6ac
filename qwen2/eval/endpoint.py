"""An OpenAI-compatible server as the subject of an eval (`--endpoint URL`): the eval's own prompts and
scoring, the server's generation, so a vLLM or llama.cpp server, or any model behind the API, is scored as
our engine is and `qwen2 eval compare` can set the two runs side by side.

Chat prompts (a list of messages) go to /v1/chat/completions, so the server renders them with its own chat
template, as it would for any client; text prompts go to /v1/completions. Of the sampling parameters the
request fields both APIs share are sent (max_tokens, temperature, top_p, seed, stop); an engine-only one
(top_k, logits processors, ...) is refused rather than silently dropped. Token-id prompts are refused: the
server's tokenizer need not be ours.

Requests run on a thread pool of `concurrency` workers and each reply goes to `on_done` as it returns, so a
resumable eval records items as they finish, as in-process. The openai client retries connection errors,
408/409/429 and 5xx with exponential backoff (`RETRIES` times); a request that still fails ends the run with
one line naming the URL, and the items already recorded stay for the rerun.

`choice_logprobs` scores a choice text after a prompt by /v1/completions' `echo` with `logprobs` (the
log-probabilities of the prompt's own tokens, as vLLM and our server give them and lm-evaluation-harness
reads them): the choice's tokens are those from the prompt's length on. Scoring by a logits processor
(teacher forcing, the full distribution) has no API, so evals that need it run in-process only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

from tqdm import tqdm

from qwen2.engine.sampling import SamplingParams
from qwen2.errors import EndpointError, OptionError

RETRIES = 3
_SENT = ("max_tokens", "temperature", "top_p", "seed", "stop")
_DEFAULTS = SamplingParams()


def base_url(url: str) -> str:
    """The API root the client talks to: URL as given, with /v1 added unless it ends in it."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


class Endpoint:
    """A model behind an OpenAI-compatible API; the harness drives it in place of an in-process LLM."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, concurrency: int = 8,
                 body: dict | None = None):
        """body: extra request fields (a server's own options), sent with every request."""
        try:
            from openai import OpenAI
        except ImportError:
            raise OptionError("--endpoint talks to the server with the openai client: pip install openai") from None
        self.url, self.concurrency, self.body = base_url(url), concurrency, body or {}
        self.client = OpenAI(base_url=self.url, api_key=api_key or "none", max_retries=RETRIES)
        # asking for the served models checks that the server is up before any item runs
        served = self._call("/models", lambda: self.client.models.list().data)
        if not (model or served):
            raise EndpointError(f"{self.url}/models lists no model; name one with --endpoint-model")
        self.model = model or served[0].id

    def _call(self, path: str, request: Callable):
        import openai

        try:
            return request()
        except openai.APIStatusError as e:
            said = " ".join(str(e.message).split())[:300]
            raise EndpointError(f"{self.url}{path} answered {e.status_code}: {said}") from None
        except openai.APIConnectionError as e:
            raise EndpointError(f"cannot reach {self.url}{path} ({e.__cause__ or e}) after {RETRIES} "
                                "retries; is the server up at that URL?") from None

    def _fields(self, params: SamplingParams) -> dict:
        unsent = [f.name for f in dataclasses.fields(SamplingParams)
                  if f.name not in _SENT and getattr(params, f.name) != getattr(_DEFAULTS, f.name)]
        if unsent:
            raise OptionError(f"an OpenAI-compatible endpoint takes no {', '.join(unsent)}; this eval runs "
                              "in-process only (drop --endpoint)")
        fields = dict(model=self.model, max_tokens=params.max_tokens, temperature=params.temperature)
        if params.top_p != 1.0:
            fields["top_p"] = params.top_p
        if params.seed is not None:
            fields["seed"] = params.seed
        if params.stop:
            fields["stop"] = params.stop
        if self.body:
            fields["extra_body"] = self.body
        return fields

    def complete(self, prompt: str | list[dict], params: SamplingParams) -> str:
        """One reply: a chat turn for messages, a continuation for text."""
        fields = self._fields(params)
        if isinstance(prompt, str):
            r = self._call("/completions", lambda: self.client.completions.create(prompt=prompt, **fields))
            return r.choices[0].text
        if not (isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt)):
            raise OptionError("an endpoint takes text or chat messages, not token ids; this eval runs in-process "
                              "only (drop --endpoint)")
        r = self._call("/chat/completions", lambda: self.client.chat.completions.create(messages=prompt, **fields))
        return r.choices[0].message.content or ""

    def generate_all(self, prompts: dict[str, str | list[dict]], params: Callable[[str], SamplingParams],
                     on_done: Callable[[str, str], None], desc: str) -> None:
        """Every prompt, at most `concurrency` in flight; `on_done(key, text)` on this thread as each returns."""
        self.each(prompts, lambda key, prompt: self.complete(prompt, params(key)), on_done, desc)

    def each(self, work: dict, request: Callable, on_done: Callable, desc: str) -> None:
        """`on_done(key, request(key, value))` for every item of `work`, requests on the pool; the first
        failure cancels the requests not yet sent and is raised."""
        with ThreadPoolExecutor(self.concurrency) as pool, tqdm(total=len(work), desc=desc, unit="req",
                                                                dynamic_ncols=True) as bar:
            pending = {pool.submit(request, key, value): key for key, value in work.items()}
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)  # record each as it returns (resumable)
                for future in finished:
                    key = pending.pop(future)
                    if future.exception() is not None:
                        pool.shutdown(cancel_futures=True)
                        raise future.exception()
                    on_done(key, future.result())
                    bar.update()

    def choice_logprobs(self, prompts: dict[str, str], choices: list[str], desc: str,
                        each: Callable[[str, list[float]], None] | None = None) -> dict[str, list[float]]:
        """For each prompt, the log-probability of each choice text right after it (the sum over the choice's
        tokens), read from the echoed prompt + choice: one request a prompt, its choices as a prompt list."""
        scores: dict[str, list[float]] = {}

        def score(key: str, prompt: str) -> list[float]:
            r = self._call("/completions", lambda: self.client.completions.create(
                model=self.model, prompt=[prompt + c for c in choices], echo=True, max_tokens=0, logprobs=1))
            return [self._after(prompt, c) for c in sorted(r.choices, key=lambda c: c.index)]

        def done(key: str, logprobs: list[float]) -> None:
            scores[key] = logprobs
            if each is not None:
                each(key, logprobs)

        self.each(prompts, score, done, desc)
        return scores

    def _after(self, prompt: str, choice) -> float:
        """The summed log-probability of the echoed tokens after `prompt`."""
        lp, start = choice.logprobs, len(prompt)
        if lp is None or not lp.text_offset or len(lp.token_logprobs or []) != len(lp.text_offset):
            raise EndpointError(f"{self.url}/completions gave no log-probabilities of the prompt's tokens (echo with "
                                "logprobs and max_tokens 0), which this eval needs")
        if start not in lp.text_offset:
            raise EndpointError(f"the server's tokenizer joins a choice to the prompt {prompt[-40:]!r} in one "
                                "token, so its log-probability cannot be read apart")
        return sum(x for x, offset in zip(lp.token_logprobs, lp.text_offset) if offset >= start)
