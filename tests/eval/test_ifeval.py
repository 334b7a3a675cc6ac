"""The generated IFEval-style set: reproducible, valid and free of contradictions, eval and data
tasks disjoint; scoring at prompt and instruction level, strict and loose; the command runs the
engine, resumes and feeds `qwen2 eval compare`."""

import json
import random

import pytest

from qwen2.cli import main
from qwen2.eval import ifeval
from qwen2.eval.instructions import KINDS, render, validate, verdicts
from qwen2.eval.stats import item_scores, percent_ci, wilson


@pytest.fixture(scope="module")
def eval_set():
    return ifeval.prompt_set("eval", 0)


def test_the_set_is_reproducible_and_a_seed_changes_only_the_constraints(eval_set):
    assert ifeval.prompt_set("eval", 0) == eval_set
    other = ifeval.prompt_set("eval", 1)
    assert [i["task"] for i in other] == [i["task"] for i in eval_set]
    assert sum(a["constraints"] != b["constraints"] for a, b in zip(eval_set, other)) > len(eval_set) // 2
    assert (eval_set[0]["id"], other[0]["id"]) == ("eval0-0", "eval1-0")  # compare never pairs different prompts


def test_eval_and_data_tasks_are_disjoint(eval_set):
    data = ifeval.prompt_set("train", 0)
    assert len(eval_set) == 500 and len(data) == 493
    assert not {i["task"] for i in eval_set} & {i["task"] for i in data}


def test_every_prompt_is_its_task_and_one_to_three_valid_compatible_constraints(eval_set):
    for item in eval_set:
        constraints = validate(item["constraints"])
        assert 1 <= len(constraints) <= 3
        assert item["prompt"] == item["task"] + "\n\n" + " ".join(render(c) for c in constraints)
        kinds = [c["kind"] for c in constraints]
        assert not any(ifeval.clash(a, b) for i, a in enumerate(kinds) for b in kinds[i + 1:])
    drawn = {c["kind"] for item in eval_set for c in item["constraints"]}
    assert drawn == set(KINDS)  # 500 prompts use every kind, each language included


@pytest.mark.parametrize("a, b, clashes", [
    ("case:lower", "case:upper", True), ("length:max_words", "length:min_words", True),
    ("language:zh", "case:lower", True), ("language:ru", "keywords:include", True),
    ("language:ja", "language:ko", True),
    ("format:json", "end:phrase", True), ("punctuation:no_comma", "format:json", True),
    ("format:quoted", "start:phrase", True), ("format:json", "format:bullets", True),
    ("language:zh", "format:bullets", False), ("case:upper", "keywords:include", False),
    ("format:title", "length:max_words", False), ("start:phrase", "end:phrase", False),
])
def test_contradicting_constraints_clash(a, b, clashes):
    assert ifeval.clash(a, b) is clashes and ifeval.clash(b, a) is clashes


def test_drawing_is_seeded():
    assert ifeval.draw_constraints(random.Random(5)) == ifeval.draw_constraints(random.Random(5))


def scored(item_constraints, reply):
    item = {"id": "x", "prompt": "p", "constraints": item_constraints}
    return ifeval.score(item, reply)


def test_prompt_level_needs_every_constraint_and_loose_forgives_a_preamble():
    lower, comma = {"kind": "case:lower"}, {"kind": "punctuation:no_comma"}
    start = {"kind": "start:phrase", "phrase": "in short"}
    records = [
        dict(scored([lower, comma], "all good here"), id="a"),  # both met
        dict(scored([lower, comma], "all good, here"), id="b"),  # one of two
        dict(scored([start], "Sure!\nIn short, yes."), id="c"),  # loose only
    ]
    assert [(r["strict"], r["loose"]) for r in records] == [([True, True], [True, True]),
                                                            ([True, False], [True, False]), ([False], [True])]
    summary = ifeval.summarize(records)
    assert (summary["prompts"], summary["instructions"]) == (3, 5)
    assert summary["prompt"]["strict"] == {"accuracy": 33.33, "ci95": percent_ci(*wilson(1, 3))}
    assert summary["prompt"]["loose"]["accuracy"] == 66.67
    assert summary["instruction"]["strict"] == {"accuracy": 60.0, "ci95": percent_ci(*wilson(3, 5))}
    assert summary["instruction"]["loose"]["accuracy"] == 80.0
    assert summary["kinds"]["punctuation:no_comma"] == {"count": 2, "strict": {"accuracy": 50.0, "ci95": percent_ci(
        *wilson(1, 2))}, "loose": {"accuracy": 50.0, "ci95": percent_ci(*wilson(1, 2))}}
    assert summary["kinds"]["start:phrase"]["strict"]["accuracy"] == 0.0
    assert item_scores(records) == {"a": 1.0, "b": 0.0, "c": 0.0}  # what `eval compare` pairs: prompt-level strict


def run_ifeval(gguf, path, limit, capsys, *extra):
    main(["eval", "ifeval", "--model", str(gguf), "--quant", "none", "--dtype", "float32", "--limit", str(limit),
          "--max-tokens", "8", "--json", str(path), "--max-concurrency", "2", *extra])
    return json.loads(path.read_text()), capsys.readouterr().out


def test_ifeval_runs_resumes_and_compares(tiny_hf, tmp_path, capsys):
    partial = tmp_path / "a.json"
    first, _ = run_ifeval(tiny_hf, partial, 2, capsys)
    resumed, out = run_ifeval(tiny_hf, partial, 3, capsys)
    assert len(partial.with_suffix(".jsonl").read_text().splitlines()) == 1 + 3  # the first two were not redone
    assert resumed["results"][:2] == first["results"]
    assert "| prompt | strict |" in out and "| instruction | loose |" in out
    kind, rates = next(iter(resumed["summary"]["kinds"].items()))
    ci = rates["strict"]["ci95"]
    assert f"| {kind} | {rates['count']} | {rates['strict']['accuracy']:.4g} | {ci[0]:g} to {ci[1]:g} |" in out
    items = ifeval.prompt_set("eval", 0)[:3]
    for item, r in zip(items, resumed["results"]):
        assert (r["id"], r["prompt"]) == (item["id"], item["prompt"])
        assert r["strict"] == verdicts(r["reply"], item["constraints"])
        assert r["correct"] == all(r["strict"])
    assert resumed["summary"]["prompts"] == 3
    assert resumed["summary"]["instructions"] == sum(len(i["constraints"]) for i in items)
    other, _ = run_ifeval(tiny_hf, tmp_path / "b.json", 3, capsys, "--prompt-seed", "1")
    assert other["settings"]["prompt_seed"] == 1
    with pytest.raises(SystemExit):  # other prompts under the same ids would be a false pairing
        main(["eval", "compare", str(partial), str(tmp_path / "b.json")])
    assert "share no scored items" in capsys.readouterr().err
    main(["eval", "compare", str(partial), str(partial)])
    assert "| 3 |" in capsys.readouterr().out
