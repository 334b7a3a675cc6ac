"""What every benchmark eval shares: batched generation, a resumable results file, the summary.

An eval is a list of items, each with an `id`; it produces one record per item. Records are
appended to `<json stem>.jsonl` as they finish (its first line holds the eval's settings), so
an interrupted run resumes where it stopped: a rerun with the same `--json` skips the items
already recorded, and refuses a file written by another eval, model or setting rather than
mixing the two. At the end `--json` gets `{"eval", "settings", "summary", "seconds",
"results"}` with the headline numbers under `summary`, and stdout a Markdown summary.

Generation goes through the engine's continuous batching: every prompt is submitted at once
and the engine fills its `max_slots` as earlier requests finish.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from tqdm import tqdm

from qwen2.engine.sampling import SamplingParams
from qwen2.errors import OptionError


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


def generate_all(llm, prompts: dict[str, str | list[int]], params: Callable[[str], SamplingParams],
                 on_done: Callable[[str, str], None], desc: str) -> None:
    """Generate every prompt with continuous batching; `on_done(key, text)` as each finishes."""
    engine = llm.engine
    pending = {engine.submit(prompt, params(key)).id: (key, []) for key, prompt in prompts.items()}
    with tqdm(total=len(pending), desc=desc, unit="req", dynamic_ncols=True) as bar:
        while pending:
            for out in engine.step():
                key, pieces = pending[out.request_id]
                pieces.append(out.text)
                if out.finish_reason is not None:
                    del pending[out.request_id]
                    on_done(key, "".join(pieces))
                    bar.update()


def write_json(path: Path, eval_name: str, settings: dict, summary: dict, seconds: float, results: list[dict]) -> None:
    """The final report, written whole then renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    partial.write_text(json.dumps(dict(eval=eval_name, settings=settings, summary=summary, seconds=round(seconds, 1),
                                       results=results), ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(partial, path)


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
