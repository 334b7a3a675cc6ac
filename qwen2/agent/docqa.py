"""Question answering over documents far longer than the model's context (the Qwen-Agent approach).

Level 1, retrieval: keywords from the model, BM25 over ~500-token chunks, the best chunks within
the budget, an answer from them. Level 2, chunk-by-chunk reading: every ~1,000-token chunk is
read with the question, all in one continuous batch; each reply is "none" or the relevant
sentences quoted (JSON). A round where every chunk says none is read again, sampled, a bounded
number of times. The quotes (checked against their chunk) and the keywords drive a second BM25
retrieval over ~300-token chunks, and the answer comes from quotes plus retrieved text. Level 3,
multi-hop: the model gets the Level-2 reader as a tool (Qwen's tool-call format, through the chat
template) and asks it sub-questions one step at a time, up to a cap on calls; a sub-question asked
again gets the earlier reading's answer without another pass over the document.

A reading prompt puts the passage before the question, so a passage read once stays in the
engine's prefix cache: the next question over the same document (level 3's sub-questions, the
retries, a user's follow-up) computes only its own question and reply per chunk, as long as the
cache holds the document (~12 KiB a token for the 0.5B model; `qwen2 docqa` sizes it so).

```python
from qwen2 import load
from qwen2.agent import DocQA
qa = DocQA(load(max_concurrency=4))
print(qa.ask("book.pdf", "Who hid the key?", level=2).answer)
```

Not covered: images and tables in PDFs, streaming the answer.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from qwen2.agent import DEFAULT_BUDGET, DEFAULT_MAX_CALLS, DEFAULT_RETRIES
from qwen2.agent.documents import SENTENCE_END, Chunk, Document, Source, read_sources, spans
from qwen2.agent.retrieval import (
    Index,
    Keywords,
    is_summary_question,
    keyword_prompt,
    parse_json_object,
    parse_keywords,
    terms,
)
from qwen2.agent.runner import EngineRunner, Runner
from qwen2.engine.llm import LLM
from qwen2.engine.sampling import SamplingParams
from qwen2.errors import OptionError
from qwen2.tools import TOOL_CALL_START, ToolCall, parse_tool_calls

RETRIEVAL_CHUNK, READING_CHUNK, EVIDENCE_CHUNK = 500, 1000, 300  # tokens, as Qwen-Agent's defaults
OVERLAP = 32  # tokens a chunk repeats from the one before, so a sentence cut at a boundary is seen whole
PROMPT_OVERHEAD, ANSWER_TOKENS, QUOTE_TOKENS = 300, 256, 200

ANSWER_SYSTEM = ("You answer questions about a document using only the excerpts given. Answer briefly and exactly; "
                 "if the excerpts do not contain the answer, say that the document does not say.")
READ_SYSTEM = ("You read one passage of a long document and decide whether it helps answer a question. If it does "
               'not, reply {"res": "none"}. If it does, copy the sentences that help, word for word: '
               '{"res": "ans", "content": "..."}. Reply with the JSON object only.')
HOP_SYSTEM = ("You answer questions about a long document you cannot see. The read_document tool answers one simple, "
              "self-contained question about it. Break a question that needs several facts into steps: ask for one "
              "fact, use the answer to write the next question, and so on. When you know the answer, reply with it "
              "in a sentence, without calling the tool.")
FIRST_CALL = TOOL_CALL_START + '\n{"name": "read_document", "arguments": {"question": "'
READ_TOOL = {"type": "function", "function": {
    "name": "read_document",
    "description": "Reads the whole document and answers one simple question about it, quoting its evidence.",
    "parameters": {"type": "object", "properties": {"question": {"type": "string", "description": "the question"}},
                   "required": ["question"]}}}


@dataclass
class Evidence:
    source: str
    chunk: int  # index of the chunk within its source, at the chunk size of the level that found it
    start: int  # character offset of the chunk in the source's text
    quote: str


@dataclass
class Answer:
    answer: str
    level: int
    evidence: list[Evidence] = field(default_factory=list)
    keywords: Keywords | None = None
    chunks_read: int = 0  # level 2 and 3: chunk readings, retries included
    rounds: int = 0  # level 2: reading rounds (1 + retries used)
    steps: list[dict] = field(default_factory=list)  # level 3: {"question", "answer"} per tool call
    document_tokens: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


class DocQA:
    def __init__(self, llm: LLM | Runner, budget: int = DEFAULT_BUDGET, retries: int = DEFAULT_RETRIES,
                 max_calls: int = DEFAULT_MAX_CALLS, quote_tokens: int = QUOTE_TOKENS,
                 answer_tokens: int = ANSWER_TOKENS, progress: bool = False):
        self.runner = EngineRunner(llm) if isinstance(llm, LLM) else llm
        need = budget + PROMPT_OVERHEAD + answer_tokens
        if need > self.runner.context:
            raise OptionError(f"a budget of {budget} tokens needs a context of {need}, but the model's holds "
                              f"{self.runner.context}; lower --budget or raise --ctx")
        if budget < READING_CHUNK:
            raise OptionError(f"the budget ({budget} tokens) must hold at least one {READING_CHUNK}-token chunk")
        self.budget, self.retries, self.max_calls, self.progress = budget, retries, max_calls, progress
        self.quote_tokens, self.answer_tokens = quote_tokens, answer_tokens  # reply limits: per chunk, per answer
        self._backwards = False  # the direction of the next chunk-by-chunk reading

    def document(self, path_or_sources: str | Path | list[Source]) -> Document:
        sources = path_or_sources if isinstance(path_or_sources, list) else read_sources(path_or_sources)
        return Document(sources, self.runner.tokenizer)

    def ask(self, document: str | Path | list[Source] | Document, question: str, level: int = 2) -> Answer:
        if not question.strip():
            raise OptionError("the question is empty; ask something about the document")
        if level not in (1, 2, 3):
            raise OptionError(f"level must be 1 (retrieval), 2 (chunk-by-chunk reading) or 3 (multi-hop), got {level}")
        t0 = time.perf_counter()
        doc = document if isinstance(document, Document) else self.document(document)
        answer = (self.retrieve, self.read, self.hop)[level - 1](doc, question)
        answer.document_tokens, answer.seconds = doc.tokens, time.perf_counter() - t0
        return answer

    # -- level 1 ---------------------------------------------------------------------------
    def keywords(self, question: str) -> Keywords:
        reply = self.runner.chat([keyword_prompt(question)], [_greedy(min(160, self.answer_tokens))])[0]
        return parse_keywords(reply, question)

    def retrieve(self, doc: Document, question: str, keywords: Keywords | None = None) -> Answer:
        keywords = keywords or self.keywords(question)
        index = Index(doc.chunks(RETRIEVAL_CHUNK, OVERLAP))
        query = keywords.query()
        front = doc.front(self.budget // 2) if is_summary_question(question) or not index.has_hits(query) else []
        chosen = index.search(query, self.budget, front)
        reply = self._answer(question, [(c, c.text) for c in chosen])
        return Answer(reply, 1, evidence=locate(reply, query, chosen), keywords=keywords)

    # -- level 2 ---------------------------------------------------------------------------
    def read(self, doc: Document, question: str) -> Answer:
        chunks = doc.chunks(READING_CHUNK, OVERLAP)
        keywords, quotes, rounds = None, [], 0
        with tqdm(total=len(chunks), desc="reading", unit="chunk", disable=not self.progress, leave=False) as bar:
            while rounds <= self.retries and not quotes:
                # retries sample (seeded, differently each round) so that a greedy all-"none" round is not repeated
                params = _greedy(self.quote_tokens) if rounds == 0 else SamplingParams(
                    max_tokens=self.quote_tokens, temperature=0.7, top_p=0.9, seed=rounds)
                # every other reading goes back to front: the engine's prefix cache evicts the least recently
                # used passages first, so the next reading starts on those still cached
                order = chunks[::-1] if self._backwards else chunks
                self._backwards = not self._backwards
                prompts = [_read_messages(c.text, question) for c in order]
                if keywords is None:  # the keyword request rides in the same batch as the first round
                    prompts.append(keyword_prompt(question))
                if rounds:
                    bar.reset()
                replies = self.runner.chat(prompts, [params] * len(prompts), progress=bar.update)
                if keywords is None:
                    keywords = parse_keywords(replies.pop(), question)
                quotes = [(c, q) for c, reply in zip(order, replies) if (q := parse_quote(reply, c.text))]
                rounds += 1
        index = Index(doc.chunks(EVIDENCE_CHUNK, OVERLAP // 2))
        wanted = keywords.query() + terms(question)
        quoted = best_quotes(quotes, wanted, max(1, self.budget // 4 // self.quote_tokens))
        query = wanted + terms(" ".join(q for _, q in quoted))
        used = sum(len(self.runner.tokenizer.encode(q)) for _, q in quoted)
        retrieved = index.search(query, self.budget - used)
        reply = self._answer(question, quoted + [(c, c.text) for c in retrieved])
        evidence = [Evidence(c.source, c.index, c.start, q) for c, q in quoted] or locate(reply, query, retrieved)
        return Answer(reply, 2, evidence=evidence, keywords=keywords, chunks_read=len(chunks) * rounds, rounds=rounds)

    # -- level 3 ---------------------------------------------------------------------------
    def hop(self, doc: Document, question: str) -> Answer:
        messages = [{"role": "system", "content": HOP_SYSTEM}, {"role": "user", "content": question}]
        steps, evidence, chunks_read = [], [], 0
        answered: dict[str, Answer] = {}  # sub-question's terms -> the reading that answered it
        while True:
            tools = [READ_TOOL] if len(steps) < self.max_calls else None
            if tools is None:  # the cap: no more reading, answer from what the tool said
                messages.append({"role": "user", "content": "Answer the original question now from the tool "
                                 f"results above: {question}"})
            # a small model tends to answer from its own knowledge at once: its first turn starts the call for it
            start = FIRST_CALL if not steps else ""
            reply = self.runner.chat([messages], [_greedy(self.answer_tokens)], tools=tools, reply_start=start)[0]
            content, calls = parse_tool_calls(reply)
            bare = parse_json_object(content) if not calls else None
            if bare and bare.get("name") == "read_document" and isinstance(bare.get("arguments"), dict):
                # a call written without its tags
                calls, content = [ToolCall("read_document", json.dumps(bare["arguments"]))], ""
            if start and not calls:  # the forced call's arguments did not parse: ask the question itself
                calls = [ToolCall("read_document", json.dumps({"question": question}))]
            if not calls or tools is None:
                # a call past the cap, or one cut off at the reply limit, is no answer: the last reading's stands
                answer = "" if _is_call(content) else content.strip()
                answer = answer or (steps[-1]["answer"] if steps else "")
                return Answer(answer, 3, evidence=evidence, chunks_read=chunks_read, steps=steps)
            calls = calls[: self.max_calls - len(steps)]
            messages.append({"role": "assistant", "content": content, "tool_calls": [
                {"type": "function", "function": {"name": c.name, "arguments": json.loads(c.arguments)}}
                for c in calls]})
            for call in calls:
                sub = _sub_question(call.arguments) or question
                key = " ".join(terms(sub))
                if key not in answered:  # a small planner often asks again: the earlier reading answers, for free
                    answered[key] = self.read(doc, sub)
                    evidence += answered[key].evidence
                    chunks_read += answered[key].chunks_read
                found = answered[key]
                steps.append({"question": sub, "answer": found.answer})
                said = "\n".join(f"- {e.quote}" for e in found.evidence[:3])
                messages.append({"role": "tool", "content": f"{found.answer}\nEvidence:\n{said}" if said
                                 else found.answer})

    # -- shared ----------------------------------------------------------------------------
    def _answer(self, question: str, excerpts: list[tuple[Chunk, str]]) -> str:
        blocks = [f"[{i}] {Path(c.source).name}, part {c.index + 1}:\n{text.strip()}"
                  for i, (c, text) in enumerate(excerpts, 1)]
        user = "Excerpts:\n\n" + "\n\n".join(blocks) + f"\n\nQuestion: {question}"
        if not excerpts:
            user = f"No excerpt of the document matched the question.\n\nQuestion: {question}"
        messages = [{"role": "system", "content": ANSWER_SYSTEM}, {"role": "user", "content": user}]
        return self.runner.chat([messages], [_greedy(self.answer_tokens)])[0].strip()


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0)


def _read_messages(passage: str, question: str) -> list[dict]:
    # the system message comes first and is the same for every chunk: the engine's prefix cache reuses it
    return [{"role": "system", "content": READ_SYSTEM},
            {"role": "user", "content": f"Passage:\n{passage.strip()}\n\nQuestion: {question}"}]


def _is_call(text: str) -> bool:
    return text.lstrip().startswith((TOOL_CALL_START, '{"name"'))


def _sub_question(arguments: str) -> str:
    value = json.loads(arguments).get("question") if arguments.strip().startswith("{") else None
    return value.strip() if isinstance(value, str) else ""


def parse_quote(reply: str, passage: str) -> str | None:
    """The passage's own sentences that a reader quoted, or None for "none", an empty reply or a quote
    not drawn from the passage. A small model misquotes (drops words, adds a name, answers instead of
    quoting), so each quoted sentence is replaced by the passage sentence sharing the most terms with
    it, if that holds at least half of them: evidence is always the document's text."""
    data = parse_json_object(reply)
    if data is not None:
        if str(data.get("res", "")).strip().lower() != "ans":
            return None
        content = data.get("content")
        quote = " ".join(map(str, content)) if isinstance(content, list) else str(content or "")
    else:
        quote = reply
    quote = quote.strip()
    if quote.lower().strip(' ."<>') in ("none", "no", "n/a", ""):
        return None
    sentences = [passage[a:b].strip() for a, b in spans(passage, 0, len(passage), SENTENCE_END)]
    vocab = [set(terms(s)) for s in sentences]
    found = set()
    for a, b in spans(quote, 0, len(quote), SENTENCE_END):
        words = set(terms(quote[a:b]))
        if words and vocab:
            i = max(range(len(vocab)), key=lambda k: len(words & vocab[k]))
            if len(words & vocab[i]) * 2 >= len(words):
                found.add(i)
    return " ".join(sentences[i] for i in sorted(found)) or None


def best_quotes(quotes: list[tuple[Chunk, str]], query: list[str], limit: int) -> list[tuple[Chunk, str]]:
    """The `limit` quotes BM25 ranks highest for the query, in document order. A small reader quotes
    loosely: over a long document the passages it wrongly finds relevant outnumber the one that is."""
    if len(quotes) <= limit:
        return sorted(quotes, key=lambda x: (x[0].source, x[0].start))
    scores = Index([replace(c, text=q) for c, q in quotes]).scores(query)
    ranked = sorted(range(len(quotes)), key=lambda i: -scores[i])[:limit]
    return sorted((quotes[i] for i in ranked), key=lambda x: (x[0].source, x[0].start))


def locate(reply: str, query: list[str], chunks: list[Chunk], limit: int = 3) -> list[Evidence]:
    """The sentences of the chosen chunks that share the most terms with the answer and the query."""
    wanted = set(terms(reply)) | set(query)
    scored = []
    for chunk in chunks:
        for a, b in spans(chunk.text, 0, len(chunk.text), SENTENCE_END):
            sentence = chunk.text[a:b].strip()
            overlap = len(wanted & set(terms(sentence)))
            if overlap:
                scored.append((overlap, chunk, sentence))
    scored.sort(key=lambda x: -x[0])
    return [Evidence(c.source, c.index, c.start, s) for _, c, s in scored[:limit]]
