"""MGSM-style eval: the original problems per language with their GSM8K gold numbers, answers in
any script's digits, accuracy per language with Wilson intervals, and a resumable run whose
items `eval compare` can pair."""

import json

import pytest

from qwen2.cli import main
from qwen2.eval import mgsm
from qwen2.eval.stats import compare


def test_the_original_problems_carry_their_gold_numbers():
    eng = mgsm.problems("eng")
    assert len(eng) == 100 and eng[0]["id"] == "eng/0000" and eng[0]["lang"] == "eng"
    fog = next(p for p in mgsm.problems("zho") if p["id"] == "zho/0001")
    assert fog["answer"] == 140 and "霧" in fog["question"]
    assert set(mgsm.MGSM) <= set(mgsm.languages()) and len(mgsm.languages()) == 109
    assert mgsm.gold("... 14 * 10 = 140\n#### 1,250\n") == 1250 and mgsm.gold("no marker") is None


def test_unknown_languages_are_refused_with_the_known_ones():
    with pytest.raises(Exception, match="unknown language code 'xx'.*eng"):
        mgsm.language_list("eng,xx")


@pytest.mark.parametrize("reply, correct", [
    ("10 * 14 = 140. The answer is 140", True),
    ("答案是 ١٤٠. The answer is ١٤٠", True),  # Arabic-Indic digits
    ("उत्तर है १४०", True),  # Devanagari, no "answer is": the last number
    ("The answer is 14", False),
])
def test_replies_are_scored_by_their_stated_number_in_any_script(reply, correct):
    assert mgsm.is_correct(reply, 140) is correct


def test_accuracy_is_reported_per_language_with_wilson_intervals():
    records = [dict(id=f"{lang}/{i}", lang=lang, correct=i < right) for lang, right in (("eng", 3), ("zho", 0))
               for i in range(4)]
    summary = mgsm.summarize(records)
    assert summary["languages"]["eng"]["accuracy"] == 75.0 and summary["languages"]["zho"]["accuracy"] == 0.0
    assert summary["languages"]["zho"]["ci95"][0] == 0.0 < summary["languages"]["zho"]["ci95"][1]
    assert summary["overall"]["problems"] == 8 and summary["overall"]["correct"] == 3


def test_the_cli_runs_resumes_and_writes_items_compare_can_pair(tiny_hf, tmp_path, capsys):
    path = tmp_path / "mgsm.json"
    args = ["eval", "mgsm", "--model", str(tiny_hf), "--quant", "none", "--lang", "eng,zho", "--max-tokens", "4",
            "--json", str(path)]
    main([*args, "--limit", "1"])
    main([*args, "--limit", "2"])
    out = capsys.readouterr().out
    assert "| eng |" in out and "| all |" in out
    run = json.loads(path.read_text())
    assert [r["id"] for r in run["results"]] == ["eng/0000", "eng/0001", "zho/0000", "zho/0001"]
    assert len(path.with_suffix(".jsonl").read_text().splitlines()) == 1 + 4  # the first two were not redone
    assert set(run["summary"]["languages"]) == {"eng", "zho"} and run["settings"]["langs"] == ["eng", "zho"]
    assert compare(run["results"], run["results"])["items"] == 4
