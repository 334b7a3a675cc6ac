"""Automated data: rejection sampling keeps exactly the correct, stated answers; execution
feedback labels programs by running their tests in the real sandbox; the commands run the
real engine end to end, resume, and never mix runs of other settings."""

import json

import pytest

from qwen2.cli import main
from qwen2.eval import humaneval
from qwen2.eval.sandbox import DEFAULT_LIMITS
from qwen2.train.synth import answer_verdict, code_groups, math_groups, math_verdict, sft_and_pairs

GOLD = "9 apples"


def test_rejection_sampling_keeps_exactly_the_correct_samples():
    replies = [
        "3 + 6 = 9. The answer is 9",  # correct
        "She has 4 + 5 = 9 apples.\nThe answer is 9.0",  # correct, another path
        "3 + 6 = 9. The answer is 9",  # a duplicate: one SFT row, not two
        "3 + 5 = 8. The answer is 8",  # wrong
        "I cannot tell.",  # wrong: no number at all
        "She has 3 + 6 = 9",  # right number but never states it (cut off?): neither kept nor rejected
        "The answer is 9 apples, or 1,000 if counted twice.",  # the first number after "answer is" counts
        "Adding, 3 + 6 = 9, so she has \\(\\boxed{9}\\) apples.",  # stated in LaTeX: kept
        "Adding, 3 + 6 = 9, so she has \\(\\boxed{10}\\) apples.",  # wrong
    ]
    verdicts = [math_verdict(r, GOLD) for r in replies]
    assert verdicts == [True, True, True, False, False, None, True, True, False]
    sft, pairs = sft_and_pairs([("How many apples?", list(zip(replies, verdicts)))])
    kept = [row["messages"][1]["content"] for row in sft]
    assert kept == [replies[0], replies[1], replies[6], replies[7]]
    assert all(row["messages"][0] == {"role": "user", "content": "How many apples?"} for row in sft)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [(replies[0], replies[3]), (replies[1], replies[4]),
                                                             (replies[6], replies[8])]
    assert pairs[0]["messages"] == [{"role": "user", "content": "How many apples?"}]


def test_a_problem_all_right_or_all_wrong_gives_no_pair():
    sft, pairs = sft_and_pairs([("p", [("The answer is 9", True)]), ("q", [("The answer is 1", False)])])
    assert len(sft) == 1 and pairs == []


def test_exec_feedback_labels_passing_and_failing_programs_through_the_sandbox():
    problem = humaneval.problems()[0]
    passing = f"Here it is:\n```python\n{problem['prompt']}{problem['canonical_solution']}```"
    failing = f"```python\ndef {problem['entry_point']}(numbers, threshold):\n    return False\n```"
    exiting = f"```python\nimport os\ndef {problem['entry_point']}(numbers, threshold):\n    os._exit(0)\n```"
    records = [humaneval.run_sample(problem, f"{problem['task_id']}#{s}", reply, "chat", DEFAULT_LIMITS, False)
               for s, reply in enumerate([failing, passing, exiting])]
    assert [r["passed"] for r in records] == [False, True, False]  # exit status 0 is no proof of a pass
    sft, pairs = sft_and_pairs(code_groups([problem], records))
    assert [row["messages"][1]["content"] for row in sft] == [passing]
    assert pairs == [{"messages": [{"role": "user", "content": humaneval.CHAT_INSTRUCTION.format(
        prompt=problem["prompt"])}], "chosen": passing, "rejected": failing}]


def run_cli(capsys, *args):
    main(["data", *args])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_reject_sample_runs_the_engine_and_resumes(tiny_hf, tmp_path, capsys):
    # the tiny random model writes noise, so its samples are nearly all wrong: this checks the
    # pipeline (engine, verdicts, files, resuming), the hand-made case above checks the selection
    out = tmp_path / "rs"
    common = ["--model", str(tiny_hf), "--quant", "none", "--limit", "2", "--max-tokens", "6", "--out", str(out),
              "--source", "asdiv"]
    first = run_cli(capsys, "reject-sample", *common, "--k", "2")
    header = read_jsonl(out / "samples.jsonl")[0]
    assert header["settings"]["source"] == header["settings"]["contaminates"] == "asdiv"
    assert first["samples"] == 4 and first["sampled_now"] == 4
    header, *records = read_jsonl(out / "samples.jsonl")
    assert header["eval"] == "data reject-sample" and len(records) == 4
    for r in records:
        assert r["verdict"] == math_verdict(r["reply"], r["answer"])
    assert len(read_jsonl(out / "sft.jsonl")) == len({(r["problem"], r["reply"]) for r in records
                                                      if r["verdict"] is True})
    again = run_cli(capsys, "reject-sample", *common, "--k", "3")
    assert again["sampled_now"] == 2 and again["samples"] == 6
    assert read_jsonl(out / "samples.jsonl")[1:5] == records  # earlier lines are kept as written
    with pytest.raises(SystemExit) as exit_:
        main(["data", "reject-sample", *common, "--k", "3", "--temperature", "0.5"])
    assert exit_.value.code == 1
    warning, error = capsys.readouterr().err.strip().splitlines()
    assert "holds samples of another run" in error
    assert warning.startswith("# warning: --source asdiv") and "asdiv score contaminated" in warning


def test_exec_feedback_runs_programs_from_the_engine(tiny_hf, tmp_path, capsys):
    out = tmp_path / "ef"
    summary = run_cli(capsys, "exec-feedback", "--model", str(tiny_hf), "--quant", "none", "--limit", "1", "--k", "2",
                      "--max-tokens", "6", "--out", str(out), "--timeout", "5", "--source", "humaneval")
    _, *records = read_jsonl(out / "samples.jsonl")
    assert summary["samples"] == len(records) == 2
    assert all(r["status"] in ("ok", "failed", "timeout", "killed") for r in records)
    assert summary["kept"] == sum(r["passed"] for r in records)
    assert len(read_jsonl(out / "pairs.jsonl")) == min(summary["kept"], summary["rejected"])


@pytest.mark.parametrize("args, phrase", [
    (["--k", "0"], "--k must be at least 1"),
    (["--k", "2", "--temperature", "0"], "--temperature 0 gives every sample the same reply"),
    (["--temperature", "-1"], "temperature"),
])
def test_bad_options_are_one_line_errors(args, phrase, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["data", "reject-sample", "--out", str(tmp_path / "x"), *args])
    assert exit_.value.code == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and phrase in error[0]


def test_user_answers_compare_as_numbers_or_as_normalised_text():
    assert [answer_verdict(r, 1250) for r in ("So 1000 + 250 = 1250.\nThe answer is 1,250", "The answer is 1250.0",
                                              "The answer is 125", "so 1250")] == [True, True, False, None]
    assert answer_verdict("The answer is ٣/٤", "0.75") is True  # text that is one number is a number
    assert [answer_verdict(r, "New York") for r in ("The answer is: **new  york**.", "\\boxed{New York}",
                                                    "The answer is Boston", "I think New York", "No idea")] == [
        True, True, False, None, False]


def test_rejection_sampling_keeps_only_verified_answers_of_user_problems():
    problems = [dict(id="a", question="2 + 2?", answer=4), dict(id="b", question="Capital of France?", answer="Paris")]
    records = [dict(problem="a", reply="The answer is 4", answer=4),
               dict(problem="a", reply="The answer is 5", answer=4),
               dict(problem="b", reply="The answer is paris.", answer="Paris"),
               dict(problem="b", reply="The answer is Lyon", answer="Paris")]
    sft, pairs = sft_and_pairs(math_groups(problems, records, answer_verdict))
    assert [row["messages"][1]["content"] for row in sft] == ["The answer is 4", "The answer is paris."]
    assert sft[0]["messages"][0]["content"].startswith("2 + 2?\nThink step by step")  # the question-only prompt
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("The answer is 4", "The answer is 5"),
                                                             ("The answer is paris.", "The answer is Lyon")]


def test_reject_sample_runs_on_a_problems_file_and_on_gsm_symbolic(tiny_hf, tmp_path, capsys):
    problems = tmp_path / "p.jsonl"
    problems.write_text('{"question": "What is 2 + 2?", "answer": 4}\n\n{"question": "Capital?", "answer": "Paris", '
                        '"id": "cap", "solution": "Paris is."}\n')
    common = ["--model", str(tiny_hf), "--quant", "none", "--max-tokens", "4", "--k", "1", "--temperature", "0"]
    summary = run_cli(capsys, "reject-sample", *common, "--problems", str(problems), "--out", str(tmp_path / "u"))
    header, *records = read_jsonl(tmp_path / "u" / "samples.jsonl")
    assert summary["problems"] == 2 and [r["problem"] for r in records] == ["1", "cap"]
    assert header["settings"]["source"] == str(problems) and "contaminates" not in header["settings"]
    assert all(r["verdict"] == answer_verdict(r["reply"], r["answer"]) for r in records)
    summary = run_cli(capsys, "reject-sample", *common, "--source", "gsm-symbolic", "--lang", "eng,zho", "--limit", "1",
                      "--out", str(tmp_path / "g"))
    header, *records = read_jsonl(tmp_path / "g" / "samples.jsonl")
    assert [r["problem"] for r in records] == ["eng/0000/0", "zho/0000/0"]
    assert header["settings"]["contaminates"] == "mgsm" and header["settings"]["langs"] == ["eng", "zho"]


def test_exec_feedback_runs_task_and_asserts_problems_through_the_sandbox():
    problem = dict(task_id="add", prompt="Write add(a, b) returning the sum.", tests="assert add(2, 3) == 5\n")
    replies = ["```python\ndef add(a, b):\n    return a + b\n```", "```python\ndef add(a, b):\n    return a - b\n```"]
    records = [humaneval.run_sample(problem, f"add#{s}", reply, "chat", DEFAULT_LIMITS, False)
               for s, reply in enumerate(replies)]
    assert [r["passed"] for r in records] == [True, False]
    _, pairs = sft_and_pairs(code_groups([problem], records))
    assert pairs[0]["messages"][0]["content"].startswith("Write add(a, b) returning the sum.\n\nReply with")


@pytest.mark.parametrize("command, lines, phrase", [
    ("reject-sample", None, "no such problems file"),
    ("reject-sample", ['{"question": "q", "answer": 1}', "{not json"], "line 2 is not JSON"),
    ("reject-sample", ['{"question": "q"}'], 'line 1 has no "answer"'),
    ("reject-sample", ['{"question": "q", "answer": true}'], 'line 1 has no "answer"'),
    ("reject-sample", ['{"question": "q", "answer": 1, "id": "x"}', '{"question": "r", "answer": 2, "id": "x"}'],
     "line 2 repeats the id"),
    ("exec-feedback", ['{"prompt": "p"}'], 'line 1 is no problem: give "prompt" and "tests"'),
])
def test_bad_problem_files_are_one_line_errors_naming_the_line(command, lines, phrase, tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    if lines is not None:
        path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit) as exit_:
        main(["data", command, "--problems", str(path), "--out", str(tmp_path / "o")])
    assert exit_.value.code == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and phrase in error[0] and "Traceback" not in error[0]


@pytest.mark.parametrize("command, args, phrase", [
    ("reject-sample", [], "name the problems: --problems FILE (your own) or --source gsm-symbolic|asdiv"),
    ("exec-feedback", [], "--source humaneval"),
    ("reject-sample", ["--source", "asdiv", "--problems", "p.jsonl"], "not both"),
    ("reject-sample", ["--source", "asdiv", "--lang", "eng"], "add --source gsm-symbolic"),
    ("reject-sample", ["--source", "gsm-symbolic", "--lang", "eng,xx"], "unknown language code 'xx'"),
])
def test_the_problems_must_be_named(command, args, phrase, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["data", command, *args, "--out", str(tmp_path / "o")])
    assert exit_.value.code == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and phrase in error[0]
