"""Level 1 of the agent: keyword retrieval (BM25) of the chunks that fit a token budget.

The model splits the question into the information it asks for and the instruction about the
answer, and writes search keywords in English and Chinese (one JSON object; when the JSON is
broken, the words of the question stand in). BM25 (rank_bm25's Okapi variant) scores the chunks
with those keywords; the best chunks fill the budget and are handed back in document order.
Summary-type questions, and questions whose keywords match nothing, also get the front of the
document.

Terms: scripts written with spaces (Latin, Cyrillic, Greek, Arabic, Hebrew, Hangul, Devanagari,
...) split into lowercased words; scripts written without them (Chinese, Japanese kana, Thai,
Lao, Khmer, Burmese) into overlapping character pairs, the usual segmenter-free indexing for
them. Not covered: stemming, synonyms, vector search (which Qwen-Agent found not worth an
embedding model).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from qwen2.agent.documents import Chunk

# Han, kana, Thai, Lao, Myanmar, Khmer: runs of these become character pairs
_UNSPACED = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u0e00-\u0e7f\u0e80-\u0eff\u1000-\u109f\u1780-\u17ff"
_TERM = re.compile(rf"[{_UNSPACED}]+|[^\W_{_UNSPACED}]+(?:['’][^\W_]+)?")
_IS_UNSPACED = re.compile(rf"[{_UNSPACED}]")
STOP_WORDS = frozenset("""a an and are as at be been but by can could did do does for from had has have how i if in
into is it its of on or our so that the their them then there these they this those to was we were what when where
which who whom whose why will with would you your about after before than also any all not no yes document text
question answer please tell me find give""".split())
SUMMARY = re.compile(r"summar|overview|main (idea|point|topic)|what is (this|the) (document|text|book|article) "
                     r"about|gist|abstract|总结|概括|摘要|主要内容|大意", re.IGNORECASE)

KEYWORD_PROMPT = """Prepare a keyword search for the question below.
1. Split the question into "information" (the facts it asks for) and "instruction" (how to answer).
2. Write search keywords for the information part: "keywords_en" in English and "keywords_zh" in Chinese,
including names, numbers and likely synonyms.
Reply with one JSON object and nothing else, for example:
{{"information": ["..."], "instruction": ["..."], "keywords_en": ["..."], "keywords_zh": ["..."]}}

Question: {question}"""


def terms(text: str) -> list[str]:
    out = []
    for match in _TERM.findall(text.lower()):
        if _IS_UNSPACED.match(match):
            out += [match] if len(match) == 1 else [match[i:i + 2] for i in range(len(match) - 1)]
        elif match not in STOP_WORDS:
            out.append(match)
    return out


@dataclass
class Keywords:
    information: list[str]
    instruction: list[str]
    keywords_en: list[str]
    keywords_zh: list[str]
    parsed: bool  # False: the model's JSON was unusable and the question's own words stand in

    def query(self) -> list[str]:
        return list(dict.fromkeys(terms(" ".join(self.keywords_en + self.keywords_zh + self.information))))


def keyword_prompt(question: str) -> list[dict]:
    return [{"role": "user", "content": KEYWORD_PROMPT.format(question=question)}]


def parse_json_object(reply: str) -> dict | None:
    """The first JSON object in a reply, also inside a ``` fence or after some words; None if none parses."""
    start = reply.find("{")
    while start >= 0:
        try:
            value, _ = json.JSONDecoder().raw_decode(reply[start:])
            if isinstance(value, dict):
                return value
        except json.JSONDecodeError:
            pass
        start = reply.find("{", start + 1)
    return None


def parse_keywords(reply: str, question: str) -> Keywords:
    """The model's keyword JSON; fields missing or of the wrong type fall back to the question's words."""
    data = parse_json_object(reply) or {}

    def strings(key: str) -> list[str]:
        value = data.get(key)
        value = [value] if isinstance(value, str) else value
        return [str(v).strip() for v in value if isinstance(v, (str, int, float)) and str(v).strip()] \
            if isinstance(value, list) else []

    en, zh = strings("keywords_en"), strings("keywords_zh")
    if not en and not zh:  # broken JSON: search with the question itself
        return Keywords([question], [], [question], [], parsed=False)
    return Keywords(strings("information") or [question], strings("instruction"), en, zh, parsed=True)


class Index:
    """BM25 over a list of chunks."""

    def __init__(self, chunks: list[Chunk]):
        from rank_bm25 import BM25Okapi

        self.chunks = chunks
        self.bm25 = BM25Okapi([terms(c.text) or ["\u0000"] for c in chunks])  # rank_bm25 divides by lengths

    def scores(self, query: list[str]) -> list[float]:
        return [float(s) for s in self.bm25.get_scores(query)] if query else [0.0] * len(self.chunks)

    def search(self, query: list[str], budget: int, front: list[Chunk] = ()) -> list[Chunk]:
        """`front` first, then the best-scoring chunks, within `budget` tokens, in document order."""
        chosen, used = [], 0
        for chunk in front:
            if used + chunk.tokens <= budget:
                chosen.append(chunk)
                used += chunk.tokens
        scored = sorted(zip(self.scores(query), range(len(self.chunks))), key=lambda x: (-x[0], x[1]))
        seen = {(c.source, c.start) for c in chosen}
        for score, i in scored:
            chunk = self.chunks[i]
            if score <= 0:
                break
            if (chunk.source, chunk.start) not in seen and used + chunk.tokens <= budget:
                chosen.append(chunk)
                used += chunk.tokens
                seen.add((chunk.source, chunk.start))
        return sorted(chosen, key=lambda c: (c.source, c.start))

    def has_hits(self, query: list[str]) -> bool:
        return any(s > 0 for s in self.scores(query))


def is_summary_question(question: str) -> bool:
    return bool(SUMMARY.search(question))
