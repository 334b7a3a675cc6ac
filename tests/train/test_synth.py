"""Automated data: rejection sampling keeps exactly the correct, stated answers; execution
feedback labels programs by running their tests in the real sandbox; the commands run the
real engine end to end, resume, and never mix runs of other settings."""

import json

import pytest

from qwen2.cli import main
from qwen2.eval import humaneval
from qwen2.eval.sandbox import DEFAULT_LIMITS
from qwen2.train.synth import code_groups, math_verdict, sft_and_pairs

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
    common = ["--model", str(tiny_hf), "--quant", "none", "--limit", "2", "--max-tokens", "6", "--out", str(out)]
    first = run_cli(capsys, "reject-sample", *common, "--k", "2")
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
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "holds samples of another run" in error[0]


def test_exec_feedback_runs_programs_from_the_engine(tiny_hf, tmp_path, capsys):
    out = tmp_path / "ef"
    summary = run_cli(capsys, "exec-feedback", "--model", str(tiny_hf), "--quant", "none", "--limit", "1", "--k", "2",
                      "--max-tokens", "6", "--out", str(out), "--timeout", "5")
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
