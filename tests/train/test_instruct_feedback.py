"""Execution feedback for instruction following: only replies meeting every constraint become SFT
data; replies are paired by the share of constraints they meet; the command samples through the
engine, resumes, refuses an edited prompt file, draws its built-in prompts away from the eval's,
and names the bad line of a prompt file in one line."""

import json

import pytest

from qwen2.cli import main
from qwen2.eval.instructions import prompt_text, verdicts
from qwen2.train.instruct_feedback import groups
from qwen2.train.synth import sft_and_pairs

SHORT = [{"kind": "length:max_words", "n": 3}, {"kind": "case:lower"}]


def test_only_replies_meeting_every_constraint_are_kept():
    item = {"id": "p.jsonl:1", "prompt": prompt_text("Name a fruit.", SHORT), "constraints": SHORT}
    replies = ["a ripe apple", "A ripe apple", "a ripe red apple", "a ripe apple", "pear"]
    records = [{"item": item["id"], "reply": reply} for reply in replies]
    (prompt, samples), = groups([item], records)
    assert samples == [("a ripe apple", 1.0), ("A ripe apple", 0.5), ("a ripe red apple", 0.5),
                       ("a ripe apple", 1.0), ("pear", 1.0)]
    sft, pairs = sft_and_pairs([(prompt, samples)])
    assert [row["messages"] for row in sft] == [[{"role": "user", "content": prompt},
                                                 {"role": "assistant", "content": reply}]
                                                for reply in ("a ripe apple", "pear")]
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("a ripe apple", "A ripe apple"),
                                                             ("pear", "a ripe red apple")]


def test_replies_are_paired_by_the_share_of_constraints_they_meet():
    three = [*SHORT, {"kind": "keywords:include", "words": ["fruit"]}]
    item = {"id": "p.jsonl:1", "prompt": prompt_text("Name a fruit.", three), "constraints": three}
    replies = ["A fruit: the apple", "an apple", "The Big Apple Pie", "fruit: pear", "A RIPE RED APPLE"]
    (prompt, samples), = groups([item], [{"item": item["id"], "reply": reply} for reply in replies])
    assert [share for _, share in samples] == [1 / 3, 2 / 3, 0.0, 1.0, 0.0]
    sft, pairs = sft_and_pairs([(prompt, samples)])
    assert [row["messages"][1]["content"] for row in sft] == ["fruit: pear"]
    # best with worst, second best with second worst; the middle reply is left alone
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("fruit: pear", "The Big Apple Pie"),
                                                             ("an apple", "A RIPE RED APPLE")]


def test_pairs_name_their_task_as_group_so_a_split_keeps_it_on_one_side(tmp_path):
    from qwen2.train.synth_cli import _write_data

    caps = prompt_text("Name a fruit.", [{"kind": "case:upper"}])
    short = prompt_text("Name a fruit.", [{"kind": "length:max_words", "n": 3}])
    groups = [(caps, [("APPLE", 1.0), ("apple", 0.0)]), (short, [("Pear.", 1.0), ("A ripe pear, I think.", 0.0)])]
    assert _write_data(tmp_path, groups, {caps: "Name a fruit.", short: "Name a fruit."}) == (2, 2)
    assert [row["group"] for row in read_jsonl(tmp_path / "pairs.jsonl")] == ["Name a fruit."] * 2


def test_a_prompt_whose_replies_all_meet_the_same_share_gives_no_pair():
    item = {"id": "p.jsonl:1", "prompt": prompt_text("Name a fruit.", SHORT), "constraints": SHORT}
    records = [{"item": item["id"], "reply": reply} for reply in ("A ripe apple", "a ripe red apple", "Pear")]
    assert sft_and_pairs(groups([item], records)) == ([], [])


def run_cli(capsys, *args):
    main(["data", "instruct-feedback", *args])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_prompts(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_instruct_feedback_keeps_verified_replies_and_resumes(tiny_hf, tmp_path, capsys):
    # the tiny random model writes noise: a prompt whose constraint any reply meets and one whose
    # constraint none meets make the outcome certain, whatever the noise
    never = [{"kind": "keywords:exclude", "words": ["zzqxv"]}]
    always_fails = [{"kind": "keywords:include", "words": ["zzqxv"]}]
    prompts = tmp_path / "p.jsonl"
    write_prompts(prompts, [{"prompt": "Name a fruit.", "constraints": never},
                            {"instruction": "Name a colour.", "constraints": always_fails}])
    out = tmp_path / "if"
    common = ["--model", str(tiny_hf), "--quant", "none", "--max-tokens", "6", "--prompts", str(prompts),
              "--out", str(out)]
    first = run_cli(capsys, *common, "--k", "2")
    assert (first["prompts"], first["samples"], first["sampled_now"]) == (2, 4, 4)
    assert (first["kept"], first["rejected"], first["pairs"], first["source"]) == (2, 2, 0, str(prompts))
    header, *records = read_jsonl(out / "samples.jsonl")
    assert header["eval"] == "data instruct-feedback" and header["settings"]["sha256"]
    for r in records:
        assert r["strict"] == verdicts(r["reply"], r["constraints"]) and r["verdict"] == all(r["strict"])
    kept_prompt = prompt_text("Name a fruit.", never)
    sft = read_jsonl(out / "sft.jsonl")
    assert {row["messages"][0]["content"] for row in sft} == {kept_prompt}
    assert sorted(row["messages"][1]["content"] for row in sft) == sorted(
        {r["reply"] for r in records if r["item"] == "p.jsonl:1"})
    again = run_cli(capsys, *common, "--k", "3")
    assert (again["sampled_now"], again["samples"]) == (2, 6)
    assert read_jsonl(out / "samples.jsonl")[1:5] == records
    write_prompts(prompts, [{"prompt": "Name a vegetable.", "constraints": never}])
    with pytest.raises(SystemExit):
        main(["data", "instruct-feedback", *common, "--k", "3"])
    assert "holds samples of another run" in capsys.readouterr().err


def test_the_built_in_prompts_are_the_data_split(tiny_hf, tmp_path, capsys):
    out = tmp_path / "builtin"
    summary = run_cli(capsys, "--model", str(tiny_hf), "--quant", "none", "--max-tokens", "4", "--limit", "2",
                      "--k", "1", "--prompt-seed", "7", "--out", str(out))
    assert (summary["prompts"], summary["source"]) == (2, "built-in")
    header, *records = read_jsonl(out / "samples.jsonl")
    assert header["settings"]["prompt_seed"] == 7
    assert [r["item"] for r in records] == ["train7-1", "train7-3"]  # odd tasks: never an eval item


@pytest.mark.parametrize("lines, phrase", [
    (None, "--prompts {path}: no such file"),
    (['{"prompt": "a", "constraints": [{"kind": "case:lower"}]}', "{oops"], "p.jsonl:2: not JSON"),
    (['[1, 2]'], "p.jsonl:1: not a JSON object"),
    (['{"constraints": [{"kind": "case:lower"}]}'], 'p.jsonl:1: needs the task as a "prompt"'),
    (['{"prompt": "a"}'], "p.jsonl:1: constraints must be a non-empty list"),
    (['', '{"prompt": "a", "constraints": [{"kind": "case:title"}]}'],
     "p.jsonl:2: constraint 1: unknown kind 'case:title'"),
    (['{"prompt": "a", "constraints": [{"kind": "length:max_words", "n": -1}]}'],
     "p.jsonl:1: constraint 1 (length:max_words): n must be a whole number"),
    ([], "holds no prompt"),
])
def test_a_bad_prompt_file_is_a_one_line_error_naming_the_line(lines, phrase, tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    if lines is not None:
        path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit) as exit_:
        main(["data", "instruct-feedback", "--prompts", str(path), "--out", str(tmp_path / "out")])
    assert exit_.value.code == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and phrase.format(path=path) in error[0]
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_a_prompt_file_that_is_not_utf8_is_refused(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(SystemExit):
        main(["data", "instruct-feedback", "--prompts", str(path), "--out", str(tmp_path / "out")])
    assert "is not UTF-8 text" in capsys.readouterr().err
