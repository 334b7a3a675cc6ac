"""Execution feedback for instruction following (`qwen2 data instruct-feedback`), as the Qwen2
report describes it: sample k replies to prompts that carry machine-checkable constraints
(qwen2.eval.instructions), keep the replies that meet every constraint (strict checking) as SFT
data, and pair replies by the share of the constraints they meet (best with worst, while the
chosen one meets more; synth.sft_and_pairs): the default model meets every constraint in under a
fifth of its replies, so all-or-nothing pairs would leave most prompts without one. The files are
synth.py's (samples.jsonl, sft.jsonl, pairs.jsonl).

Prompts come from a file, one JSON object a line: `{"prompt": task, "constraints": [{"kind": id,
...parameters}]}` ("instruction" may stand for "prompt"), or from the built-in set: alpaca tasks
with drawn constraints, taken from the tasks `qwen2 eval ifeval` never uses (qwen2.eval.ifeval).
Either way the model sees the task followed by one sentence per constraint (`prompt_text`), and
that is the user turn written to the data. A reply cut off by --max-tokens is judged as it stands.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from qwen2.engine.sampling import SamplingParams
from qwen2.errors import DataError, OptionError
from qwen2.eval import ifeval
from qwen2.eval.harness import Results, generate_all
from qwen2.eval.instructions import prompt_text, validate, verdicts
from qwen2.train.data import read_records


def load_prompts(path: Path) -> list[dict]:
    """The prompts of a file as {id ("file:line"), task, constraints, prompt}; the first bad record
    stops it with a DataError naming its line."""
    if not path.is_file():
        raise OptionError(f"--prompts {path}: no such file")
    try:
        records = list(read_records(path))
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    items = []
    for where, record in records:
        if isinstance(record, str):
            raise DataError(f"{where}: {record}")
        task = record.get("prompt", record.get("instruction"))
        if not isinstance(task, str) or not task.strip():
            raise DataError(f"{where}: needs the task as a \"prompt\" (or \"instruction\") string")
        try:
            constraints = validate(record.get("constraints"))
        except ValueError as e:
            raise DataError(f"{where}: {e}") from None
        items.append(dict(id=where, task=task, constraints=constraints, prompt=prompt_text(task, constraints)))
    if not items:
        raise DataError(f"{path} holds no prompt")
    return items


def prompts(path: Path | None, prompt_seed: int) -> tuple[list[dict], dict]:
    """The prompts, and where they came from for the run's settings (a file by its content, so an
    edited file is never resumed into)."""
    if path is None:
        return ifeval.prompt_set("train", prompt_seed), dict(source="built-in", prompt_seed=prompt_seed)
    items = load_prompts(path)
    return items, dict(source=str(path), sha256=hashlib.sha256(path.read_bytes()).hexdigest())


def sample(llm, items: list[dict], results: Results, k: int, temperature: float, max_tokens: int, seed: int) -> None:
    """Sample and check every (prompt, sample) not yet in `results`; sample s uses seed + s."""
    by_key, chats = {}, {}
    for item in items:
        for s in range(k):
            key = f"{item['id']}#{s}"
            if key not in results:
                by_key[key] = item
                chats[key] = [{"role": "user", "content": item["prompt"]}]

    def params(key: str) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + int(key.rsplit("#", 1)[1]))

    def done(key: str, reply: str) -> None:
        item = by_key[key]
        strict = verdicts(reply, item["constraints"])
        results.add(dict(id=key, item=item["id"], sample=int(key.rsplit("#", 1)[1]), constraints=item["constraints"],
                         reply=reply, strict=strict, verdict=all(strict)))

    generate_all(llm, chats, params, done, desc="instruct-feedback")


def groups(items: list[dict], records: list[dict]) -> list[tuple[str, list[tuple[str, float]]]]:
    """(prompt, [(reply, share of its constraints met)]) per prompt, the verdicts checked afresh."""
    by_item: dict[str, list] = {}
    for r in records:
        by_item.setdefault(r["item"], []).append(r["reply"])
    return [(item["prompt"], [(reply, _share(verdicts(reply, item["constraints"]))) for reply in by_item[item["id"]]])
            for item in items if item["id"] in by_item]


def _share(passed: list[bool]) -> float:
    return sum(passed) / len(passed)
