"""What every benchmark eval shares: batched generation, a resumable results file, the summary.

An eval is a list of items, each with an `id`; it produces one record per item. Records are
appended to `<json stem>.jsonl` as they finish (its first line holds the eval's settings), so
an interrupted run resumes where it stopped: a rerun with the same `--json` skips the items
already recorded, and refuses a file written by another eval, model or setting rather than
mixing the two. At the end `--json` gets `{"eval", "settings", "summary", "seconds",
"results"}` with the headline numbers under `summary`, and stdout a Markdown summary.

Generation goes through the engine's continuous batching: every prompt is submitted at once
and the engine fills its `max_concurrency` as earlier requests finish. Scoring goes the same way:
`next_token_logprobs` reads the distribution after each prompt (one prefill each), and
`continuation_logprobs` teacher-forces a given continuation through the decoder, so contexts
shared by several continuations are prefilled once (the engine's prefix cache).

A prompt is text, token ids, or chat messages; messages are rendered here with the model's chat
template. The subject may instead be an OpenAI-compatible server (qwen2.eval.endpoint.Endpoint,
`--endpoint`): `generate_all` and `choice_logprobs` hand it the same prompts, and it renders
messages with its own template. Or engine actors on Ray (qwen2.eval.engine_actors, `--ray`):
`generate_all` and `next_token_logprobs` deal the prompts to them, and each renders as here.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from tqdm import tqdm

from qwen2.engine.sampling import SamplingParams
from qwen2.errors import OptionError
from qwen2.eval.endpoint import Endpoint
from qwen2.eval.engine_actors import EngineActors
from qwen2.files import write_text_atomically


class Results:
    """The per-item records of one run, backed by an append-only JSONL file (or memory only)."""

    def __init__(self, eval_name: str, settings: dict, json_path: Path | None):
        self.eval_name, self.settings = eval_name, settings
        self.path = json_path.with_suffix(".jsonl") if json_path is not None else None
        self.records: dict[str, dict] = {}
        self._lock = threading.Lock()  # records may arrive from worker threads
        header = {"eval": eval_name, "settings": settings}
        if self.path is not None and self.path.exists() and self.path.stat().st_size:
            with self.path.open(encoding="utf-8") as f:
                lines = [json.loads(line) for line in f if line.strip()]
            if not lines or lines[0] != header:
                found = lines[0] if lines else {}
                raise OptionError(f"{self.path} holds results of another run ({found.get('eval')}, "
                                  f"{found.get('settings')}), not of {eval_name} with {settings}; give another "
                                  "--json path or delete that file to start afresh")
            self.records = {r["id"]: r for r in lines[1:]}
        elif self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._append(header)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self.records

    def add(self, record: dict) -> None:
        with self._lock:
            self.records[record["id"]] = record
            if self.path is not None:
                self._append(record)

    def _append(self, obj: dict) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")

    def ordered(self, ids: Iterable[str]) -> list[dict]:
        return [self.records[i] for i in ids if i in self.records]


Prompt = str | list[int] | list[dict]  # text, token ids, or chat messages


def generate_all(llm, prompts: dict[str, Prompt], params: Callable[[str], SamplingParams],
                 on_done: Callable[[str, str], None], desc: str) -> None:
    """Generate every prompt with continuous batching; `on_done(key, text)` as each finishes."""
    if isinstance(llm, (Endpoint, EngineActors)):
        return llm.generate_all(prompts, params, on_done, desc)
    keys = list(prompts)
    with tqdm(total=len(keys), desc=desc, unit="req", dynamic_ncols=True) as bar:
        def finished(i: int, text: str) -> None:
            on_done(keys[i], text)
            bar.update()

        llm.engine.run_all([rendered(llm, prompts[k]) for k in keys], [params(k) for k in keys], on_finish=finished)


def rendered(llm, prompt: Prompt) -> str | list[int]:
    """The prompt as the engine takes it: chat messages rendered with the model's chat template."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
        return llm.tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
    return prompt


def choice_logprobs(llm, prompts: dict[str, str], choices: list[str], desc: str,
                    each: Callable[[str, list[float]], None] | None = None) -> dict[str, list[float]]:
    """The log-probability of each choice text (one token each in-process) right after each prompt;
    `each(key, logprobs)` as each prompt is scored."""
    if isinstance(llm, Endpoint):
        return llm.choice_logprobs(prompts, choices, desc, each)
    ids = [llm.tokenizer.encode(choice) for choice in choices]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"the choices {choices} are not single tokens in this vocabulary: {ids}")
    return next_token_logprobs(llm, prompts, [i[0] for i in ids], desc, each)


def next_token_logprobs(llm, prompts: dict[str, str | list[int]], token_ids: list[int], desc: str,
                        each: Callable[[str, list[float]], None] | None = None) -> dict[str, list[float]]:
    """The log-probabilities of `token_ids` as the token after each prompt (one forward each, batched);
    `each(key, logprobs)` as each prompt is scored (a resumable eval records it there)."""
    if isinstance(llm, EngineActors):
        return llm.next_token_logprobs(prompts, token_ids, desc, each)
    choices = torch.tensor(token_ids)
    scores: dict[str, list[float]] = {}

    def params(key: str) -> SamplingParams:
        def capture(_output: list[int], logits: torch.Tensor) -> torch.Tensor:
            scores[key] = torch.log_softmax(logits, -1)[choices].tolist()
            return logits
        return SamplingParams(max_tokens=1, temperature=0, logits_processors=[capture])

    def done(key: str, _text: str) -> None:
        if each is not None:
            each(key, scores[key])

    generate_all(llm, prompts, params, done, desc=desc)
    _check_complete(prompts, scores)
    return scores


def continuation_logprobs(llm, pairs: dict[str, tuple[list[int], list[int]]],
                          desc: str) -> dict[str, tuple[list[float], bool]]:
    """For each (context ids, continuation ids): the log-probability of every continuation token
    given the context and the continuation before it, and whether greedy decoding yields the
    whole continuation. The engine decodes each continuation under a logits processor that
    records the next token's log-probability, then allows that token alone (teacher forcing)."""
    scores: dict[str, tuple[list[float], bool]] = {}

    def params(key: str) -> SamplingParams:
        target = pairs[key][1]
        logprobs: list[float | None] = [None] * len(target)
        greedy = [True] * len(target)

        def force(output: list[int], logits: torch.Tensor) -> torch.Tensor:
            i, token = len(output), target[len(output)]
            logprobs[i] = torch.log_softmax(logits, -1)[token].item()
            greedy[i] = int(logits.argmax()) == token
            forced = torch.full_like(logits, float("-inf"))
            forced[token] = 0.0
            return forced

        scores[key] = (logprobs, greedy)
        return SamplingParams(max_tokens=len(target), temperature=0, ignore_eos=True, logits_processors=[force])

    generate_all(llm, {key: context for key, (context, _) in pairs.items()}, params, lambda _k, _t: None, desc=desc)
    _check_complete(pairs, {key: lp for key, (lp, _) in scores.items() if None not in lp})
    return {key: (lp, all(greedy)) for key, (lp, greedy) in scores.items()}


def _check_complete(asked: dict, scored: dict) -> None:
    missing = [key for key in asked if key not in scored]
    if missing:  # the engine ended these requests with an error (logged by the engine)
        raise RuntimeError(f"the engine failed to score {len(missing)} of {len(asked)} requests, e.g. {missing[0]!r}")


def write_json(path: Path, eval_name: str, settings: dict, summary: dict, seconds: float, results: list[dict]) -> None:
    """The final report, written whole then renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, json.dumps(dict(eval=eval_name, settings=settings, summary=summary,
                                                seconds=round(seconds, 1), results=results),
                                           ensure_ascii=False, indent=1))


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def choose(name: str, value: str, valid: Iterable[str]) -> str:
    """`value` if it is one of `valid`, else an OptionError that lists them."""
    valid = list(valid)
    if value not in valid:
        raise OptionError(f"unknown {name} {value!r}; choose one of {', '.join(valid)}")
    return value
