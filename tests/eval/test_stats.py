"""Intervals and paired tests against values worked out by hand (or by the textbook formulas)."""

import json
import math

import pytest

from qwen2.cli import main
from qwen2.eval.stats import (
    block_bootstrap_ci,
    bootstrap_ci,
    breakdown,
    compare,
    mcnemar_exact,
    paired_bootstrap,
    share,
    wilson,
)


def test_wilson_interval_matches_the_formula_and_stays_inside_0_1():
    low, high = wilson(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    assert wilson(0, 20)[0] == 0.0 and 0.15 < wilson(0, 20)[1] < 0.17  # 0/20: up to 16.1%
    assert wilson(20, 20)[1] == 1.0
    low, high = wilson(150, 300)
    assert math.isclose(high - 0.5, 0.5 - low) and 0.055 < high - 0.5 < 0.057  # about 1.96 * sqrt(.25/300)


def test_a_share_is_a_percent_with_its_wilson_interval_and_nothing_for_no_items():
    assert share(8, 10) == {"percent": 80.0, "ci95": [49.02, 94.33]}
    assert share(0, 0) == {"percent": None, "ci95": None}


def test_a_block_bootstrap_resamples_stretches_not_single_values():
    alternating = [0.0, 1.0] * 50  # every stretch of two has mean 0.5: resampling stretches cannot move it
    assert block_bootstrap_ci(alternating, block=2) == (0.5, 0.5)
    low, high = bootstrap_ci(alternating)
    assert low < 0.45 and high > 0.55
    halves = [0.0] * 50 + [1.0] * 50  # two stretches of 50: a resample is 0, 0.5 or 1
    assert block_bootstrap_ci(halves, block=50) == (0.0, 1.0)
    assert block_bootstrap_ci([2.0, 2.0, 2.0, 2.0, 2.0], block=2) == (2.0, 2.0)  # a short last block weighs less


def test_exact_mcnemar_is_the_two_sided_binomial_test_on_disagreements():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert mcnemar_exact(9, 1) == pytest.approx(2 * 11 / 1024)
    assert mcnemar_exact(5, 5) == 1.0


def test_bootstrap_intervals_cover_the_mean_and_narrow_with_more_items():
    few, many = [0.0, 1.0] * 10, [0.0, 1.0] * 1000
    low, high = bootstrap_ci(few)
    assert low < 0.5 < high and bootstrap_ci(many)[1] - bootstrap_ci(many)[0] < (high - low) / 5
    shifted = paired_bootstrap([0.0] * 50, [0.3] * 25 + [0.5] * 25)
    assert shifted["difference"] == pytest.approx(0.4) and shifted["p"] < 0.01
    assert paired_bootstrap([0.2, 0.8] * 20, [0.8, 0.2] * 20)["p"] > 0.5


def _run(eval_name: str, scores: dict[str, bool], field: str = "correct") -> dict:
    return {"eval": eval_name, "results": [{"id": k, field: v} for k, v in scores.items()]}


def test_compare_pairs_items_and_uses_mcnemar_for_right_or_wrong():
    a = _run("mmlu", {f"q{i}": i < 50 for i in range(100)})
    b = _run("mmlu", {f"q{i}": i < 60 for i in range(100)} | {"extra": True})  # only shared items count
    result = compare(a["results"], b["results"])
    assert (result["items"], result["a"], result["b"], result["difference"]) == (100, 50.0, 60.0, 10.0)
    assert (result["only_a"], result["only_b"], result["test"]) == (0, 10, "exact McNemar")
    assert result["p"] == pytest.approx(2 / 1024) and result["ci95"][0] > 0


def test_compare_averages_samples_per_problem_and_bootstraps(tmp_path, capsys):
    records = lambda passed: [{"id": f"{t}/{s}", "task_id": t, "sample": s, "passed": passed(t, s)}  # noqa: E731
                              for t in range(40) for s in range(4)]
    a = {"eval": "humaneval", "results": records(lambda t, s: s < 2)}
    b = {"eval": "humaneval", "results": records(lambda t, s: s < 3)}
    result = compare(a["results"], b["results"])
    assert (result["a"], result["b"], result["test"]) == (50.0, 75.0, "paired bootstrap")
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, run in zip(paths, (a, b)):
        path.write_text(json.dumps(run))
    main(["eval", "compare", *map(str, paths), "--json", str(tmp_path / "c.json")])
    assert "| 40 | 50 | 75 | 25 |" in capsys.readouterr().out
    assert json.loads((tmp_path / "c.json").read_text())["difference"] == 25.0


def test_compare_refuses_runs_of_different_evals(tmp_path, capsys):
    for name, run in (("a", _run("mmlu", {"q": True})), ("b", _run("asdiv", {"q": True}))):
        (tmp_path / f"{name}.json").write_text(json.dumps(run))
    (tmp_path / "bad.json").write_text("{not json")
    for b in ("b.json", "bad.json"):
        with pytest.raises(SystemExit) as exit_:
            main(["eval", "compare", str(tmp_path / "a.json"), str(tmp_path / b)])
        assert exit_.value.code != 0 and "error" in capsys.readouterr().err


def _by_language(only_a: int, only_b: int, both: int, lang: str) -> tuple[list[dict], list[dict]]:
    """Records of one language where A alone is right on `only_a` items, B alone on `only_b`, both on `both`."""
    pattern = [(True, False)] * only_a + [(False, True)] * only_b + [(True, True)] * both
    a = [{"id": f"{lang}/{i}", "lang": lang, "correct": x} for i, (x, _) in enumerate(pattern)]
    b = [{"id": f"{lang}/{i}", "lang": lang, "correct": y} for i, (_, y) in enumerate(pattern)]
    return a, b


def test_breakdown_runs_exact_mcnemar_within_each_language(tmp_path, capsys):
    eng, zho = _by_language(0, 5, 5, "eng"), _by_language(9, 1, 0, "zho")
    a, b = eng[0] + zho[0], eng[1] + zho[1]
    by = breakdown(a, b)
    assert list(by) == ["language"] and list(by["language"]) == ["eng", "zho"]
    english, chinese = by["language"]["eng"], by["language"]["zho"]
    assert (english["items"], english["a"], english["b"], english["only_a"], english["only_b"]) == (10, 50.0, 100.0,
                                                                                                     0, 5)
    assert english["p"] == pytest.approx(2 / 32) and english["test"] == "exact McNemar"
    assert chinese["p"] == pytest.approx(2 * 11 / 1024) and chinese["difference"] == -80.0
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, records in zip(paths, (a, b)):
        path.write_text(json.dumps({"eval": "mgsm", "results": records}))
    main(["eval", "compare", *map(str, paths), "--json", str(tmp_path / "c.json")])
    out = capsys.readouterr().out
    assert "| language | items |" in out and "| eng | 10 | 50 | 100 | 50 |" in out
    assert json.loads((tmp_path / "c.json").read_text())["by"]["language"]["zho"]["only_a"] == 9


def test_breakdown_counts_an_item_in_each_of_its_categories_and_reads_safety_verdicts():
    a = [{"id": "1#en", "language": "en", "categories": ["Fraud", "Pornography"], "harmful": True},
         {"id": "2#en", "language": "en", "categories": ["Fraud"], "harmful": False},
         {"id": "3#en", "language": "en", "categories": [], "harmful": False}]
    b = [r | {"harmful": False} for r in a]
    by = breakdown(a, b)
    assert {k: v["items"] for k, v in by["category"].items()} == {"Fraud": 2, "Pornography": 1}
    assert by["category"]["Fraud"]["only_a"] == 1 and by["language"]["en"]["a"] == pytest.approx(33.33)
    assert breakdown([{"id": "q", "correct": True}], [{"id": "q", "correct": False}]) == {}  # nothing to group by
