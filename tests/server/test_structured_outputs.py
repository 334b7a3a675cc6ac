"""vLLM's structured outputs (choice, regex, Lark grammar, JSON) and their older guided_* names:
whatever the model's logits, the reply matches. The tiny random model samples freely, so a
constraint that leaked would show; the default model picks a sensible choice."""

import json
import re

import pytest

PHONE = r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}"  # not \\d: the Rust regex takes every Unicode digit
SUM = 'start: NUMBER " + " NUMBER " = " NUMBER\nNUMBER: /[1-9][0-9]{0,2}/'
SUMMED = r"[1-9]\d{0,2} \+ [1-9]\d{0,2} = [1-9]\d{0,2}"
COUNT = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 99, "minimum": 0}}, "required": ["n"],
         "additionalProperties": False}


@pytest.mark.parametrize("constraint, matches", [
    ({"structured_outputs": {"choice": ["red", "green", "blue sky"]}}, lambda t: t in ("red", "green", "blue sky")),
    ({"guided_choice": ["yes", "no"]}, lambda t: t in ("yes", "no")),
    ({"structured_outputs": {"regex": PHONE}}, lambda t: re.fullmatch(PHONE, t)),
    ({"guided_regex": "[a-z]{2,5}"}, lambda t: re.fullmatch("[a-z]{2,5}", t)),
    ({"structured_outputs": {"grammar": SUM}}, lambda t: re.fullmatch(SUMMED, t)),
    ({"structured_outputs": {"json": COUNT}}, lambda t: isinstance(json.loads(t)["n"], int)),
    ({"guided_json": '{"type": "array", "items": {"type": "boolean"}, "maxItems": 3}'},
     lambda t: all(isinstance(b, bool) for b in json.loads(t))),
])  # fmt: skip
def test_every_sampled_reply_matches(tiny_server, constraint, matches):
    client = tiny_server.client()
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Go."}], n=4, seed=1,
                                          temperature=1.0, max_tokens=40, extra_body=constraint)
    completion = client.completions.create(model="tiny", prompt="Go.", n=2, seed=2, temperature=1.0, max_tokens=40,
                                           extra_body=constraint)
    texts = [c.message.content for c in chat.choices] + [c.text for c in completion.choices]
    assert all(matches(t) for t in texts), texts
    assert {c.finish_reason for c in chat.choices} == {"stop"}


def test_the_default_model_picks_the_sensible_choice(default_server):
    r = default_server.client().chat.completions.create(
        model="default", temperature=0, max_tokens=5,
        extra_body={"structured_outputs": {"choice": ["positive", "negative"]}},
        messages=[{"role": "user", "content": "Is this review positive or negative? 'Awful. It broke on day one.'"}])
    assert r.choices[0].message.content == "negative"


@pytest.mark.parametrize("body, param", [
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs"),
    ({"structured_outputs": {"grammar": "start: foo("}}, "structured_outputs"),
    ({"structured_outputs": {"choice": ["a"], "regex": "b"}}, "structured_outputs"),
    ({"guided_json": "{not json"}, "structured_outputs"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ({"structured_outputs": {"choice": ["a"]}, "response_format": {"type": "json_object"}}, "structured_outputs"),
])  # fmt: skip
def test_a_constraint_that_cannot_be_enforced_is_a_400_naming_it(tiny_server, body, param):
    r = tiny_server.request("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], **body})
    assert r.status == 400 and r.json()["error"]["param"] == param, r.text
