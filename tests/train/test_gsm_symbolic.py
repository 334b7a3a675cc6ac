"""GSM-Symbolic templates: the evaluator runs only the forms it lists, an instance is the same for
a seed, meets its conditions, and its answer is what the template's own worked answer computes."""

import random
import re

import pytest

from qwen2.eval import mgsm
from qwen2.train import gsm_symbolic as gs
from qwen2.train.gsm_symbolic import TemplateError, draw, evaluate, instantiate, parse, parse_template

FOG = """A fog bank covers {d,3} miles every {t,10} minutes. The city is {y,42} miles across. How many minutes?

#init:
- $t = range(2, 500)
- $d = range(2, 100)
- $y=range(2, 100)
- name, (a, b) = sample([("Ann", (1, 2)), ("Bo", (3, 4))])

#conditions:
- is_int(y/d)
- y > d

#answer:
y//d*t
"""


@pytest.mark.parametrize("text", [
    "x.__class__",  # attribute access
    "__import__('os')",  # a dunder name
    "import os",  # a statement
    "open('/etc/passwd')",  # a call of anything not in FUNCTION_NAMES
    "(lambda: 1)()",
    "[c for c in names]",
    "names[1:3]",  # slices
    "sample(names, n=2)",  # keywords
    "f'{x}'",
])
def test_the_evaluator_refuses_anything_but_its_forms(text):
    with pytest.raises(TemplateError):
        parse(text)


def test_the_evaluator_computes_and_refuses_arithmetic_on_text_and_huge_powers():
    env = {"y": 42, "d": 3, "t": 10, "unit": "mile", "pairs": [(1, 2)]}
    assert evaluate(parse("y//d*t if y > d and not y < 0 else 0"), env) == 140
    assert evaluate(parse("plural(y, unit, unit + 's') + '!'"), {**env, **gs.functions(random.Random(0))}) == "miles!"
    assert evaluate(parse("pairs[0][1] * 2 ** 3 % 5"), env) == 1
    for text in ("unit * 1000000", "2 ** 1000", "unknown + 1"):
        with pytest.raises(TemplateError):
            evaluate(parse(text), env)


def test_an_instance_is_reproducible_meets_its_conditions_and_answers_the_formula():
    template = parse_template("test/0001", FOG)
    first = [instantiate(template, {}, seed) for seed in range(20)]
    assert first == [instantiate(template, {}, seed) for seed in range(20)]
    assert len({p["question"] for p in first}) == 20  # the seed changes the numbers
    for problem in first:
        d, t, y = map(int, re.findall(r"\d+", problem["question"]))
        assert y % d == 0 and y > d and 2 <= t < 500
        assert problem["answer"] == y // d * t
    values = draw(template, {}, 0)
    assert values["name"] in ("Ann", "Bo") and (values["a"], values["b"]) in ((1, 2), (3, 4))


def test_a_template_without_a_possible_draw_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(gs, "TRIES", 50)
    template = parse_template("test/0002", FOG.replace("- y > d", "- y > 1000"))
    with pytest.raises(TemplateError, match="no draw of 50 met the conditions"):
        instantiate(template, {}, 0)


def test_real_templates_agree_with_their_own_worked_answers():
    # the template's "#### {expression}" line is a second formula written by its authors:
    # for every English template we instantiate, both give one number
    files, words = mgsm.read_language("eng")
    checked = 0
    for f in files:
        if f.get("ignore"):
            continue
        try:
            template = parse_template(f["id"], f["question_annotated"])
            values, answer = draw(template, words, 7), instantiate(template, words, 7)["answer"]
        except TemplateError:
            continue
        assert all(evaluate(c, values) for c in template.conditions)
        worked = re.findall(r"####\s*\{(.+)\}", f["answer_annotated"])
        if worked:
            assert evaluate(parse(worked[-1]), values) == pytest.approx(answer, abs=1e-6), f["id"]
            checked += 1
    assert checked >= 80


def test_the_defaults_of_a_template_give_the_original_answer():
    files, _ = mgsm.read_language("zho")
    f = next(f for f in files if f["id"] == "zho/0001")
    template = parse_template(f["id"], f["question_annotated"])
    assert evaluate(template.answer, {"t": 10, "d": 3, "y": 42}) == mgsm.gold(f["answer"]) == 140


def test_problems_instantiate_the_usable_templates_and_count_the_rest():
    found, skipped = gs.problems(["eng", "ukr"], seed=0)
    by_lang = {lang: [p for p in found if p["lang"] == lang] for lang in ("eng", "ukr")}
    assert len(by_lang["eng"]) + sum(skipped.values()) >= 100 and len(by_lang["eng"]) >= 90
    assert len(by_lang["ukr"]) >= 80  # its plural forms are the East Slavic rule
    assert len(found) + sum(skipped.values()) == 200
    assert all(isinstance(p["answer"], (int, float)) and "{" not in p["question"] for p in found)
    limited, _ = gs.problems(["eng"], seed=0, variants=2, limit=3)
    assert [p["id"] for p in limited] == [f"eng/000{i}/{v}" for i in range(3) for v in range(2)]
