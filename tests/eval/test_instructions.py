"""Every instruction verifier accepts a reply that follows it and rejects one that does not; loose
checking forgives exactly IFEval's preamble, closing line and markdown `*`; bad constraints are
refused with a message that names the fault."""

import pytest

from qwen2.eval.instructions import KINDS, prompt_text, render, validate, verdicts

# (constraint, a reply that follows it, a reply that does not)
CASES = [
    ({"kind": "length:max_words", "n": 5}, "Crepes need flour and eggs.", "Crepes need flour, eggs, milk and butter."),
    ({"kind": "length:max_words", "n": 3}, "Don't over-mix.", "Do not over mix."),  # don't: 1 word, over-mix: 2
    ({"kind": "length:min_words", "n": 6}, "Whisk the flour, eggs and the milk.", "Whisk everything together."),
    ({"kind": "length:sentences", "n": 2, "relation": "at most"}, "Heat the pan. Pour 2.5 dl of batter!",
     "Heat the pan. Pour the batter. Flip it."),
    ({"kind": "length:sentences", "n": 3, "relation": "at least"}, "<<Crepes>>\nMix. Rest the batter.",
     "Mix the batter, then rest it."),
    ({"kind": "paragraphs:count", "n": 2}, "First, mix.\n\n  \nThen cook.\n", "First, mix.\nThen cook."),
    ({"kind": "format:json"}, '```json\n{"steps": ["mix", "cook"]}\n```', 'Here: {"steps": ["mix"]}'),
    ({"kind": "format:json"}, '[1, 2]', '"just a string"'),  # a bare scalar is no JSON output
    ({"kind": "format:bullets", "n": 3}, "Steps:\n* mix\n* rest\n  - cook\n**Enjoy!**",
     "* mix\n* rest\n---\n1. cook"),  # bold, a rule and a numbered line are not bullets
    ({"kind": "format:title"}, "<<Perfect Crepes>>\nMix...",
     "<< >>\nPerfect Crepes"),
    ({"kind": "format:sections", "n": 2, "splitter": "Section"}, "## Section 1\nMix.\n**Section 2**\nCook.",
     "Section 1\nMix. As Section 2 says, cook."),  # a marker must open its line
    ({"kind": "format:highlights", "n": 2}, "Use *cold* milk and **rest** the batter.", "Use *cold* milk.\n* rest"),
    ({"kind": "format:quoted"}, '  "Mix, rest, cook."\n', 'Mix, "rest", cook.'),
    ({"kind": "format:quoted"}, "“Mix, rest, cook.”", '"'),
    ({"kind": "keywords:include", "words": ["butter", "non-stick pan"]}, "Melt BUTTER in a non-stick pan.",
     "Melt butter in a pan."),
    ({"kind": "keywords:include", "words": ["egg"]}, "Crack one egg.", "Crack two eggs."),  # whole words only
    ({"kind": "keywords:exclude", "words": ["sugar", "salt"]}, "No sweetener, no saltiness.", "Add a pinch of Salt."),
    ({"kind": "keywords:frequency", "word": "pan", "n": 2, "relation": "at least"}, "Pan hot? Then the pan is ready.",
     "Heat the pan and the panini press."),
    ({"kind": "keywords:frequency", "word": "pan", "n": 1, "relation": "at most"}, "Heat the pan.",
     "Heat the pan, then oil the pan."),
    ({"kind": "case:lower"}, "mix the batter, 2 eggs.", "mix the batter with 2 Eggs."),
    ({"kind": "case:lower"}, "ok", "123 !"),  # no letters at all is not lowercase writing
    ({"kind": "case:upper"}, "MIX THE BATTER, 2 EGGS!", "MIX THE BATTEr"),
    ({"kind": "punctuation:no_comma"}, "Mix then cook.", "Mix, then cook."),
    ({"kind": "punctuation:no_comma"}, "先混合再煎。", "先混合，再煎。"),  # the full-width comma counts
    ({"kind": "start:phrase", "phrase": "My answer is"}, "\n my answer is: crepes", "Well, my answer is crepes"),
    ({"kind": "end:phrase", "phrase": "Any other questions?"}, "Cook it.\nAny other questions?  ",
     "Any other questions? Cook it."),
    ({"kind": "language:zh"}, "可丽饼需要面粉、鸡蛋和牛奶 (milk)。", "Crepes need flour, 鸡蛋 and milk."),
    ({"kind": "language:zh"}, "可丽饼很好吃。", "面粉と卵を混ぜます。"),  # kana: Japanese, not Chinese
    ({"kind": "language:ja"}, "クレープは小麦粉と卵で作ります。", "可丽饼需要面粉和鸡蛋。"),
    ({"kind": "language:ko"}, "크레페는 밀가루로 만듭니다.", "Crepes are made with flour."),
    ({"kind": "language:ru"}, "Блины готовят из муки и яиц (eggs).", "Bliny are made from flour."),
    ({"kind": "language:ar"}, "تصنع الكريب من الدقيق والبيض.", "Crepes 123 456 789."),
    ({"kind": "language:he"}, "קרפ עשוי מקמח וביצים.", "Crepe is made of flour."),
    ({"kind": "language:el"}, "Οι κρέπες φτιάχνονται με αλεύρι.", "Crepes with alevri."),
    ({"kind": "language:th"}, "เครปทำจากแป้งและไข่", "Crepes are thin."),
    ({"kind": "language:hi"}, "क्रेप आटे और अंडे से बनता है।", "Crepe aate se banta hai."),
]


def test_every_kind_has_a_positive_and_a_negative_example():
    assert {c["kind"] for c, _, _ in CASES} == set(KINDS)


@pytest.mark.parametrize("constraint, good, bad", CASES, ids=[c["kind"] for c, _, _ in CASES])
def test_verifier_accepts_a_following_reply_and_rejects_another(constraint, good, bad):
    assert validate([constraint]) == [constraint]
    assert verdicts(good, [constraint]) == [True]
    assert verdicts(bad, [constraint]) == [False]


def test_loose_forgives_a_preamble_a_closing_line_and_emphasis_but_strict_does_not():
    reply = "Sure! Here it is:\n**my answer is yes**\nLet me know if you need more."
    constraints = [{"kind": "start:phrase", "phrase": "my answer is"}, {"kind": "case:lower"},
                   {"kind": "end:phrase", "phrase": "yes"}, {"kind": "keywords:include", "words": ["banana"]}]
    assert verdicts(reply, constraints) == [False, False, False, False]
    assert verdicts(reply, constraints, loose=True) == [True, True, True, False]  # a missing keyword stays missing


def test_loose_never_passes_on_an_empty_variant():
    # removing both lines of a two-line reply leaves nothing, and nothing has no commas trivially
    assert verdicts("a, b\nc, d", [{"kind": "punctuation:no_comma"}], loose=True) == [False]


def test_prompt_text_appends_one_sentence_per_constraint():
    constraints = [{"kind": "length:max_words", "n": 50}, {"kind": "keywords:include", "words": ["eggs", "milk"]},
                   {"kind": "end:phrase", "phrase": "Bon appetit!"}]
    assert prompt_text("Describe making crepes.\n", constraints) == (
        'Describe making crepes.\n\nAnswer with at most 50 words. Include the keywords "eggs", "milk" in the '
        'response. Finish your response with the exact phrase "Bon appetit!". No other words should follow it.')
    assert render({"kind": "length:sentences", "n": 3, "relation": "at least"}) == (
        "Your response should contain at least 3 sentences.")


@pytest.mark.parametrize("constraints, phrase", [
    ([], "non-empty list"),
    ({"kind": "case:lower"}, "non-empty list"),
    (["case:lower"], "constraint 1 is not an object"),
    ([{"kind": "case:lower"}, {"kind": "case:title"}], "constraint 2: unknown kind 'case:title'; known kinds: "),
    ([{"kind": "length:max_words"}], "takes n; got none"),
    ([{"kind": "case:lower", "n": 3}], "takes no parameters; got n"),
    ([{"kind": "length:max_words", "n": 0}], "n must be a whole number from 1 to 10000, got 0"),
    ([{"kind": "length:max_words", "n": "50"}], "got '50'"),
    ([{"kind": "length:max_words", "n": True}], "got True"),
    ([{"kind": "length:sentences", "n": 2, "relation": "less than"}], 'relation must be "at least" or "at most"'),
    ([{"kind": "keywords:include", "words": []}], "words must be a non-empty list"),
    ([{"kind": "keywords:include", "words": "eggs"}], "words must be a non-empty list"),
    ([{"kind": "start:phrase", "phrase": "two\nlines"}], "phrase must be a one-line string"),
    ([{"kind": "format:sections", "n": 2, "splitter": "Sec tion"}], "splitter must be one word"),
])
def test_bad_constraints_are_refused_naming_the_fault(constraints, phrase):
    with pytest.raises(ValueError) as error:
        validate(constraints)
    assert phrase in str(error.value)
