"""Instructions a program can check: "answer in at most 50 words", "use no commas", "end with
this phrase". The Qwen2 report's execution feedback for instruction following, and the idea of
IFEval (Zhou et al. 2023), written here from its description.

A constraint is a dict: `{"kind": id, **parameters}`, e.g. `{"kind": "length:max_words", "n": 50}`.
`validate` checks a list of them (a ValueError names the first fault), `render` writes the
sentence that asks for one, `prompt_text` appends those sentences to a task, and `verdicts` says
which constraints a reply meets. Strict checks the reply as it is; loose (IFEval's) also accepts
a constraint when the reply passes with its first line, last line or both removed, or with
markdown `*` deleted, forgiving a preamble ("Sure, here it is:"), a closing offer or emphasis.

What the checks cannot tell (each is text matching, no language model):
- Words are runs of letters and digits (`don't` one word, `well-known` two), so word counts are
  meaningless for Chinese or Japanese, which do not space their words.
- Sentences end at . ! ? followed by a space, at 。！？ and at line breaks, so "e.g. this" is two
  sentences and a bullet list's lines are sentences.
- `language:<code>` checks the writing system, not the language: more than half the letters must
  be in the script (and for Japanese some kana, which tells it from Chinese). It cannot tell
  Russian from Ukrainian, Arabic from Persian, or English from French, so no Latin-script
  language is offered; digits, punctuation and spaces count for no language.
- Keywords match whole words, ignoring case; inflections ("run" vs "running") do not match.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

RELATIONS = ("at least", "at most")
_WORD = re.compile(r"\w+(?:['’]\w+)*")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])|\n+")
_BULLET = re.compile(r"^\s*[*-]\s+\S", re.MULTILINE)
_TITLE = re.compile(r"<<[^\n<>]*[^\s<>][^\n<>]*>>")
_HIGHLIGHT = re.compile(r"\*\*?[^\n*]*[^\s*][^\n*]*\*\*?")
_FENCE = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.DOTALL | re.IGNORECASE)
# code: (name, scripts counted: the first word of a letter's Unicode name)
LANGUAGES = {"zh": ("Chinese", ("CJK",)), "ja": ("Japanese", ("HIRAGANA", "KATAKANA", "CJK")),
             "ko": ("Korean", ("HANGUL",)), "ru": ("Russian", ("CYRILLIC",)), "ar": ("Arabic", ("ARABIC",)),
             "he": ("Hebrew", ("HEBREW",)), "el": ("Greek", ("GREEK",)), "th": ("Thai", ("THAI",)),
             "hi": ("Hindi", ("DEVANAGARI",))}
_KANA = ("HIRAGANA", "KATAKANA")


def word_count(text: str) -> int:
    return len(_WORD.findall(text))


def sentence_count(text: str) -> int:
    return sum(1 for piece in _SENTENCE_END.split(text) if re.search(r"\w", piece))


def paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]


def _compare(count: int, relation: str, n: int) -> bool:
    return count >= n if relation == "at least" else count <= n


def _mentions(text: str, word: str) -> int:
    return len(re.findall(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.IGNORECASE))


def _is_json(text: str) -> bool:
    """The whole reply is a JSON object or array, perhaps inside one markdown code block."""
    text = text.strip()
    fenced = _FENCE.fullmatch(text)
    try:
        value = json.loads(fenced.group(1) if fenced else text)
    except ValueError:
        return False
    return isinstance(value, (dict, list))


def _quoted(text: str) -> bool:
    text = text.strip()
    return len(text) >= 2 and (text[0], text[-1]) in (('"', '"'), ("“", "”"))


def _sections(text: str, n: int, splitter: str) -> bool:
    """Exactly n lines open with "<splitter> <number>" (markdown heading marks or bold allowed)."""
    return len(re.findall(rf"^\W*{re.escape(splitter)}\s+\d+", text, re.MULTILINE)) == n


def script_share(text: str, scripts: tuple[str, ...]) -> float:
    """The fraction of the letters in `text` that belong to one of `scripts`."""
    letters = [unicodedata.name(ch, "").partition(" ")[0] for ch in text if ch.isalpha()]
    return sum(name in scripts for name in letters) / len(letters) if letters else 0.0


def in_language(text: str, code: str) -> bool:
    share = script_share(text, LANGUAGES[code][1])
    if code in ("zh", "ja"):  # both write with Han characters; only Japanese uses kana
        kana = script_share(text, _KANA) >= 0.1
        return share > 0.5 and kana == (code == "ja")
    return share > 0.5


@dataclass(frozen=True)
class Kind:
    text: str  # the instruction, formatted with the parameters (words as "a", "b")
    check: Callable[..., bool]  # check(reply, **parameters)
    params: tuple[str, ...] = ()


KINDS: dict[str, Kind] = {
    "length:max_words": Kind("Answer with at most {n} words.", lambda r, n: word_count(r) <= n, ("n",)),
    "length:min_words": Kind("Answer with at least {n} words.", lambda r, n: word_count(r) >= n, ("n",)),
    "length:sentences": Kind("Your response should contain {relation} {n} sentences.",
                             lambda r, n, relation: _compare(sentence_count(r), relation, n), ("n", "relation")),
    "paragraphs:count": Kind("Your response should have exactly {n} paragraphs, separated from each other by "
                             "one blank line.", lambda r, n: len(paragraphs(r)) == n, ("n",)),
    "format:json": Kind("Your entire output should be one JSON object or array; you may wrap it in a markdown "
                        "code block (```).", _is_json),
    "format:bullets": Kind("Your answer must contain exactly {n} bullet points, each a line that starts with "
                           "\"* \".", lambda r, n: len(_BULLET.findall(r)) == n, ("n",)),
    "format:title": Kind("Your answer must contain a title, wrapped in double angular brackets, such as "
                         "<<a day in spring>>.", lambda r: _TITLE.search(r) is not None),
    "format:sections": Kind("Your response must have {n} sections. Mark the beginning of each section with "
                            "\"{splitter} X\", where X is its number.", _sections, ("n", "splitter")),
    "format:highlights": Kind("Highlight at least {n} parts of your answer with markdown, i.e. *highlighted part*.",
                              lambda r, n: len(_HIGHLIGHT.findall(r)) >= n, ("n",)),
    "format:quoted": Kind("Wrap your entire response in double quotation marks.", _quoted),
    "keywords:include": Kind("Include the keywords {words} in the response.",
                             lambda r, words: all(_mentions(r, w) for w in words), ("words",)),
    "keywords:exclude": Kind("Do not include the keywords {words} in the response.",
                             lambda r, words: not any(_mentions(r, w) for w in words), ("words",)),
    "keywords:frequency": Kind("In your response, the word \"{word}\" should appear {relation} {n} times.",
                               lambda r, word, n, relation: _compare(_mentions(r, word), relation, n),
                               ("word", "n", "relation")),
    "case:lower": Kind("Your entire response should be in lowercase letters; no capital letters are allowed.",
                       str.islower),
    "case:upper": Kind("Your entire response should be in capital letters only.", str.isupper),
    "punctuation:no_comma": Kind("In your entire response, do not use any commas.",
                                 lambda r: "," not in r and "，" not in r),
    "start:phrase": Kind("Start your response with the exact phrase \"{phrase}\".",
                         lambda r, phrase: r.strip().lower().startswith(phrase.strip().lower()), ("phrase",)),
    "end:phrase": Kind("Finish your response with the exact phrase \"{phrase}\". No other words should follow it.",
                       lambda r, phrase: r.strip().lower().endswith(phrase.strip().lower()), ("phrase",)),
    **{f"language:{code}": Kind(f"Your entire response should be in {name}; no other language is allowed.",
                                partial(in_language, code=code)) for code, (name, _) in LANGUAGES.items()},
}


def _text(value) -> bool:
    return isinstance(value, str) and bool(value.strip()) and "\n" not in value


# parameter: (test, what a good value is)
PARAMS: dict[str, tuple[Callable[[object], bool], str]] = {
    "n": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 10_000,
          "a whole number from 1 to 10000"),
    "relation": (lambda v: v in RELATIONS, " or ".join(f'"{r}"' for r in RELATIONS)),
    "words": (lambda v: isinstance(v, list) and bool(v) and all(_text(w) for w in v),
              "a non-empty list of one-line strings"),
    "word": (_text, "a one-line string"),
    "phrase": (_text, "a one-line string"),
    "splitter": (lambda v: isinstance(v, str) and re.fullmatch(r"\w+", v) is not None, "one word, e.g. Section"),
}


def validate(constraints: object) -> list[dict]:
    """`constraints` if it is a non-empty list of well-formed constraints; else a ValueError saying
    what is wrong with which one."""
    if not isinstance(constraints, list) or not constraints:
        raise ValueError("constraints must be a non-empty list of {\"kind\": ..., parameters} objects")
    for i, c in enumerate(constraints, 1):
        if not isinstance(c, dict) or not isinstance(c.get("kind"), str):
            raise ValueError(f"constraint {i} is not an object with a \"kind\" string")
        kind = KINDS.get(c["kind"])
        if kind is None:
            raise ValueError(f"constraint {i}: unknown kind {c['kind']!r}; known kinds: {', '.join(KINDS)}")
        given = set(c) - {"kind"}
        if given != set(kind.params):
            wanted = ", ".join(kind.params) or "no parameters"
            raise ValueError(f"constraint {i} ({c['kind']}) takes {wanted}; got {', '.join(sorted(given)) or 'none'}")
        for name in kind.params:
            test, good = PARAMS[name]
            if not test(c[name]):
                raise ValueError(f"constraint {i} ({c['kind']}): {name} must be {good}, got {c[name]!r}")
    return constraints


def _params(constraint: dict) -> dict:
    return {k: v for k, v in constraint.items() if k != "kind"}


def render(constraint: dict) -> str:
    """The sentence that asks for `constraint`."""
    shown = {k: ", ".join(f'"{w}"' for w in v) if isinstance(v, list) else v for k, v in _params(constraint).items()}
    return KINDS[constraint["kind"]].text.format(**shown)


def prompt_text(task: str, constraints: list[dict]) -> str:
    """The task, a blank line, then one sentence per constraint."""
    return task.strip() + "\n\n" + " ".join(render(c) for c in constraints)


def loose_variants(reply: str) -> list[str]:
    """The reply, without its first line, last line or both, each also with every `*` deleted."""
    variants = []
    for text in (reply, reply.replace("*", "")):
        lines = text.split("\n")
        variants += [text, "\n".join(lines[1:]), "\n".join(lines[:-1]), "\n".join(lines[1:-1])]
    return [v for v in dict.fromkeys(variants) if v.strip()]


def follows(reply: str, constraint: dict) -> bool:
    """Strict: does the reply, exactly as written, meet the constraint?"""
    return KINDS[constraint["kind"]].check(reply, **_params(constraint))


def verdicts(reply: str, constraints: list[dict], loose: bool = False) -> list[bool]:
    """Per constraint, whether the reply meets it (loose: whether any loose variant does)."""
    texts = loose_variants(reply) if loose else [reply]
    return [any(follows(text, c) for text in texts) for c in constraints]
