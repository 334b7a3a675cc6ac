"""Automated alignment data, as the Qwen2 report describes it: sample several answers per
problem from the model and let an automatic check sort them.

- Rejection sampling (maths): k chain-of-thought solutions per problem (the user's own,
  instantiated GSM-Symbolic templates, or ASDiv), prompted and scored as `qwen2 eval asdiv`
  does (qwen2.eval.asdiv). A solution is kept when its answer equals the gold answer and it
  states it ("The answer is N", as asked, or a LaTeX \\boxed{N}); a reply that states nothing
  and whose last number happens to match (it may have been cut off) is neither kept nor used
  as a wrong example; a wrong answer is a rejected example. ASDiv golds ("9 apples") are read
  as the eval reads them (`math_verdict`); other golds (`answer_verdict`) are numbers, compared
  as numbers, or text, compared with the stated answer after case and spaces are normalised.
  Verdicts are recomputed from the replies whenever the data files are built, so the files
  always follow this rule.
- Execution feedback (code): k programs per problem (the user's own, or HumanEval's),
  prompted, extracted and run against the problem's tests in the sandbox as `qwen2 eval
  humaneval` does (qwen2.eval.humaneval); passing programs are kept, failing ones rejected.

The output folder holds:
- samples.jsonl: every sample with its verdict, appended as each finishes (the first line
  holds the run's settings). A rerun with the same settings resumes where it stopped, a
  larger --k or --limit adds only the missing samples, and a file from other settings is
  refused rather than mixed in.
- sft.jsonl: `{"messages": [user, assistant]}` for each kept reply (distinct replies per
  problem), the chat data `qwen2 train sft` reads.
- pairs.jsonl: `{"messages": [user], "chosen": reply, "rejected": reply}`, the kept and the
  rejected replies of one problem paired one to one (min(kept, rejected) pairs per problem,
  no reply used twice; instruction following pairs by the share of constraints met, see
  sft_and_pairs), the preference data `qwen2 train dpo` and `qwen2 train rm` read.
sft.jsonl and pairs.jsonl are rebuilt from samples.jsonl at the end of every run.
Not covered: the report's other sources (data repurposing, constitutional feedback,
instruction evolution), and model-written tests for execution feedback (HumanEval's own
tests are used).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path

from qwen2.engine.sampling import SamplingParams
from qwen2.eval import asdiv, humaneval, mgsm
from qwen2.eval.harness import Results, generate_all
from qwen2.files import write_text_atomically

Verdict = Callable[[str, "float | str"], "bool | None"]  # (reply, gold answer) -> kept, rejected or neither


def math_prompt(problem: dict) -> str:
    if "passage" in problem:  # ASDiv
        return asdiv.INSTRUCTION.format(passage=problem["passage"].strip(), question=problem["question"].strip())
    return asdiv.QUESTION_INSTRUCTION.format(question=problem["question"].strip())


def math_verdict(reply: str, gold: str) -> bool | None:
    """For ASDiv's answers ("9 apples": its first number counts, as the eval scores it).
    True: kept (correct, and the answer stated: "the answer is N" or a LaTeX \\boxed{N});
    False: wrong; None: correct only by the eval's last-number fallback (a reply that may have
    been cut off), so neither kept nor rejected."""
    return _stated(reply) if asdiv.is_correct(reply, gold) else False


def answer_verdict(reply: str, answer: float | str) -> bool | None:
    """For a user's or GSM-Symbolic's answer, as math_verdict decides. A number, or text that is
    one number ("1,250", "3/4"), is compared as a number (asdiv's rule, any script's digits read
    as ASCII); other text must equal the stated answer (after the last "answer is", or in the
    last \\boxed{}) once case, spaces and surrounding punctuation are normalised."""
    reply = mgsm.ascii_digits(reply)
    number = answer if isinstance(answer, (int, float)) else _one_number(answer)
    if number is not None:
        return _stated(reply) if asdiv.same_number(asdiv.extract_answer(reply), float(number)) else False
    stated = _stated_text(reply)
    if stated is None:  # nothing stated: the answer somewhere in it may be a reply cut off
        return None if _normal(answer) in _normal(reply) else False
    return _normal(stated) == _normal(answer)


def _stated(reply: str) -> bool | None:
    return True if "answer is" in reply.lower() or "\\boxed{" in reply else None


def _one_number(text: str) -> float | None:
    text = text.strip()
    return asdiv.to_number(text) if re.fullmatch(r"-?\d[\d,]*(\.\d+)?(/\d+)?|-?\.\d+", text) else None


def _stated_text(reply: str) -> str | None:
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", reply)
    if boxed:
        return boxed[-1]
    cut = reply.lower().rfind("answer is")
    return reply[cut + len("answer is"):].split("\n")[0] if cut >= 0 else None


def _normal(text: str) -> str:
    return " ".join(text.casefold().split()).strip(" .,:;!*\"'`")


def code_prompt(problem: dict) -> str:
    return humaneval.chat_prompt(problem)


def reject_sample(llm, problems: list[dict], results: Results, k: int, temperature: float, max_tokens: int,
                  seed: int, verdict: Verdict = math_verdict) -> None:
    """Sample and judge every (problem, sample) not yet in `results`."""
    by_key, prompts = {}, {}
    for problem in problems:
        for s in range(k):
            key = f"{problem['id']}#{s}"
            if key not in results:
                by_key[key] = problem
                prompts[key] = [{"role": "user", "content": math_prompt(problem)}]

    def params(key: str) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + int(key.rsplit("#", 1)[1]))

    def done(key: str, reply: str) -> None:
        problem = by_key[key]
        results.add(dict(id=key, problem=problem["id"], sample=int(key.rsplit("#", 1)[1]), answer=problem["answer"],
                         reply=reply, extracted=asdiv.extract_answer(reply),
                         verdict=verdict(reply, problem["answer"])))

    generate_all(llm, prompts, params, done, desc="reject-sample")


def sft_and_pairs(groups: Iterable[tuple[str, list[tuple[str, bool | float | None]]]]
                  ) -> tuple[list[dict], list[dict]]:
    """From (user prompt, [(reply, verdict)]) per problem: the SFT rows (distinct kept replies)
    and the preference pairs. A verdict is True (kept) / False (rejected) / None (neither), or a
    score in [0, 1], the share of a prompt's checks the reply passed (1: kept). Pairs: the best
    reply with the worst, the second best with the second worst, while the chosen one scores
    higher (ties in the order sampled), no reply used twice: for True/False verdicts that is kept
    vs rejected one to one; for shares, graded pairs, so a prompt none of whose replies passes
    every check still says which reply followed more of them."""
    sft, pairs = [], []
    for prompt, samples in groups:
        scored = list(dict.fromkeys((reply, float(v)) for reply, v in samples if v is not None))
        user = [{"role": "user", "content": prompt}]
        sft += [{"messages": [*user, {"role": "assistant", "content": reply}]} for reply, s in scored if s == 1]
        best = sorted(range(len(scored)), key=lambda i: (-scored[i][1], i))
        worst = sorted(range(len(scored)), key=lambda i: (scored[i][1], i))
        for hi, lo in zip(best, worst):
            if scored[hi][1] <= scored[lo][1]:
                break
            pairs.append({"messages": user, "chosen": scored[hi][0], "rejected": scored[lo][0]})
    return sft, pairs


def math_groups(problems: list[dict], records: list[dict],
                verdict: Verdict = math_verdict) -> list[tuple[str, list[tuple[str, bool | None]]]]:
    by_problem: dict[str, list] = {}
    for r in records:
        by_problem.setdefault(r["problem"], []).append((r["reply"], verdict(r["reply"], r["answer"])))
    return [(math_prompt(p), by_problem[p["id"]]) for p in problems if p["id"] in by_problem]


def code_groups(problems: list[dict], records: list[dict]) -> list[tuple[str, list[tuple[str, bool | None]]]]:
    by_problem: dict[str, list] = {}
    for r in records:
        by_problem.setdefault(r["task_id"], []).append((r["completion"], r["passed"]))
    return [(code_prompt(p), by_problem[p["task_id"]]) for p in problems if p["task_id"] in by_problem]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Written whole, then renamed into place, so a reader never sees half a file."""
    write_text_atomically(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
