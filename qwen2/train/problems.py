"""A user's own problems for `qwen2 data reject-sample|exec-feedback --problems FILE`, read from
JSONL (one JSON object per line, blank lines skipped). A line we cannot use stops the run with
one DataError naming the file and the line.

Maths (reject-sample): `{"question": text, "answer": number or text, "solution": text
(optional, not used: the model's own solutions are judged), "id": text or number (optional,
default the line number)}`; how an answer is compared: qwen2.train.synth.answer_verdict.

Code (exec-feedback): HumanEval's fields `{"task_id", "prompt", "entry_point", "test"}` (the
prompt is code to complete; `test` defines `check`, called with the entry point), or
`{"prompt": the task in words, "tests": Python with asserts, run after the program}` with an
optional "task_id" or "id" (default the line number).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from qwen2.errors import DataError

HUMANEVAL_FIELDS = ("task_id", "prompt", "entry_point", "test")


def _lines(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line."""
    if not path.is_file():
        raise DataError(f"no such problems file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {n} is not JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path} line {n} is not a JSON object")
        yield n, record


def _text(record: dict, key: str) -> bool:
    return isinstance(record.get(key), str) and bool(record[key].strip())


def _id(path: Path, n: int, record: dict, keys: tuple[str, ...], seen: set[str]) -> str:
    given = next((record[k] for k in keys if k in record), n)
    if isinstance(given, bool) or not isinstance(given, (str, int)):
        raise DataError(f"{path} line {n}: {keys[0]} must be text or a whole number, got {given!r}")
    if str(given) in seen:
        raise DataError(f"{path} line {n} repeats the id {given!r}; ids must be unique")
    seen.add(str(given))
    return str(given)


def math_problems(path: Path) -> list[dict]:
    """`{"id", "question", "answer"}` per line (the answer as given: a number or text)."""
    problems, seen = [], set()
    for n, record in _lines(path):
        answer = record.get("answer")
        if not _text(record, "question"):
            raise DataError(f'{path} line {n} has no "question" text; each line needs "question" and "answer"')
        if isinstance(answer, bool) or not (isinstance(answer, (int, float)) or _text(record, "answer")):
            raise DataError(f'{path} line {n} has no "answer" (a number, or text); each line needs "question" '
                            'and "answer"')
        if "solution" in record and not isinstance(record["solution"], str):
            raise DataError(f'{path} line {n}: "solution" must be text')
        problems.append(dict(id=_id(path, n, record, ("id",), seen), question=record["question"], answer=answer))
    if not problems:
        raise DataError(f"{path} holds no problems")
    return problems


def code_problems(path: Path) -> list[dict]:
    """HumanEval-shaped problems, or `{"task_id", "prompt", "tests"}` ones, per line."""
    problems, seen = [], set()
    for n, record in _lines(path):
        if all(_text(record, k) for k in HUMANEVAL_FIELDS):
            problems.append({k: record[k] for k in HUMANEVAL_FIELDS})
            _id(path, n, record, ("task_id",), seen)
        elif _text(record, "prompt") and _text(record, "tests"):
            problems.append(dict(task_id=_id(path, n, record, ("task_id", "id"), seen), prompt=record["prompt"],
                                 tests=record["tests"]))
        else:
            raise DataError(f'{path} line {n} is no problem: give "prompt" and "tests" (asserts run after the '
                            f'program), or HumanEval\'s {", ".join(HUMANEVAL_FIELDS)}')
    if not problems:
        raise DataError(f"{path} holds no problems")
    return problems
