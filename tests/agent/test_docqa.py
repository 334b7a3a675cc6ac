"""The agent's levels on a small random model with the real tokenizer: batched reading, retries, the tool loop."""

import json

import pytest

from qwen2.agent.docqa import FIRST_CALL, OVERLAP, READING_CHUNK, DocQA, best_quotes, parse_quote
from qwen2.agent.documents import Chunk, Source
from qwen2.agent.runner import EngineRunner
from qwen2.engine.engine import Engine
from qwen2.engine.llm import LLM
from qwen2.errors import OptionError
from qwen2.tools import TOOL_CALL_END, TOOL_CALL_START
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def tiny_llm(default_tokenizer):
    import torch

    from qwen2.model import Transformer

    torch.manual_seed(0)
    model = Transformer(tiny_config(max_position_embeddings=4096)).eval()
    engine = Engine(model, default_tokenizer, max_concurrency=4, max_seq_len=4096)
    return LLM(model, default_tokenizer, engine)


def small_document() -> list[Source]:
    from qwen2.eval.data import haystack_text

    return [Source("wiki.txt", haystack_text()[:11000])]


class Recording(EngineRunner):
    """The real engine, with a record of the requests it was given and how many ran together each step."""

    def __init__(self, llm: LLM):
        super().__init__(llm)
        self.batch_sizes: list[int] = []
        self.requests = []
        step, submit = self.engine.step, self.engine.submit

        def counted():
            self.batch_sizes.append(len(self.engine.running))
            return step()

        def kept(prompt, params):
            self.requests.append(submit(prompt, params))
            return self.requests[-1]

        self.engine.step, self.engine.submit = counted, kept


@pytest.fixture
def recording(tiny_llm):
    yield Recording(tiny_llm)
    del tiny_llm.engine.step, tiny_llm.engine.submit  # the engine's own methods again


def test_level_2_reads_every_chunk_in_one_batch_and_retries_when_all_say_none(tiny_llm, recording):
    runner = recording
    qa = DocQA(runner, budget=2048, retries=2, quote_tokens=12, answer_tokens=16)
    doc = qa.document(small_document())
    chunks = doc.chunks(READING_CHUNK, 32)
    assert len(chunks) >= 3
    answer = qa.ask(doc, "What is the secret passphrase for the vault?", level=2)
    # a random model quotes nothing from the passage: every round says none, so both retries run
    assert answer.rounds == 3 and answer.chunks_read == 3 * len(chunks)
    assert max(runner.batch_sizes) == 4  # the chunks shared the engine's four slots
    assert not tiny_llm.engine.has_work


def test_a_second_question_finds_the_passages_read_for_the_first_in_the_cache(tiny_llm, recording):
    runner = recording
    qa = DocQA(runner, budget=1024, retries=0, quote_tokens=4, answer_tokens=4)
    doc = qa.document(small_document())
    chunks = doc.chunks(READING_CHUNK, 32)
    tiny_llm.engine.clear_prefix_cache()
    qa.ask(doc, "What is the secret passphrase for the vault?", level=2)
    first = [r for r in runner.requests if chunks[0].text.strip()[:40] in runner.tokenizer.decode(r.prompt)]
    runner.requests.clear()
    qa.ask(doc, "Which city is the capital?", level=2)
    readings = runner.requests[: len(chunks)]
    # the second reading goes back to front, starting on the passages the first one read last
    assert chunks[-1].text.strip()[:40] in runner.tokenizer.decode(readings[0].prompt)
    assert first[0].cached_tokens < 100  # the shared system prompt at most
    cached = sum(r.cached_tokens for r in readings) / sum(len(r.prompt) for r in readings)
    assert cached > 0.8  # each passage's keys and values came from the first reading; only the question is new


def test_the_quotes_that_match_the_question_are_kept_when_too_many_chunks_quote(tiny_llm):
    def chunk(i: int) -> Chunk:
        return Chunk("doc.txt", i, i * 100, i * 100 + 90, "x", 20)

    quotes = [(chunk(i), f"The river {i} flows past the old mill near the town.") for i in range(12)]
    quotes.insert(7, (chunk(20), "The special magic number for Lisbon is 2674092."))
    kept = best_quotes(quotes, ["magic", "number", "lisbon"], 3)
    assert len(kept) == 3 and kept[-1][1] == "The special magic number for Lisbon is 2674092."
    assert [c.index for c, _ in kept] == sorted(c.index for c, _ in kept)  # back in document order
    assert best_quotes(quotes[:2], ["magic"], 3) == quotes[:2]


def test_level_1_retrieves_within_the_budget(tiny_llm):
    qa = DocQA(tiny_llm, budget=1024, answer_tokens=16)
    answer = qa.ask(small_document(), "Summarise the document.", level=1)
    assert answer.level == 1 and answer.keywords is not None and answer.chunks_read == 0


class ScriptedPlanner(EngineRunner):
    """A random model never writes a tool call, so the planner's turns are scripted here (the one part
    mocked): with tools offered it always asks the reader again. The reader itself runs on the real engine."""

    def __init__(self, llm: LLM, ask=lambda turn: f"step {turn}?"):
        super().__init__(llm)
        self.planner_turns, self.ask = 0, ask

    def chat(self, conversations, params, tools=None, progress=None, reply_start=""):
        if tools is None and conversations[0][0]["content"].startswith("You answer questions about a long"):
            self.planner_turns += 1
            return ["The answer is in the tool results."]
        if tools is not None:
            self.planner_turns += 1
            assert (reply_start == FIRST_CALL) == (self.planner_turns == 1)  # the first turn is a call, begun for it
            call = json.dumps({"name": "read_document", "arguments": {"question": self.ask(self.planner_turns)}})
            # the second call comes without its tags, as the small model sometimes writes it
            return [f"{TOOL_CALL_START}\n{call}\n{TOOL_CALL_END}" if self.planner_turns == 1 else call]
        return super().chat(conversations, params, tools, progress)


def test_level_3_calls_the_reader_tool_and_stops_at_the_cap(tiny_llm):
    runner = ScriptedPlanner(tiny_llm)
    qa = DocQA(runner, budget=1024, retries=0, max_calls=2, quote_tokens=12, answer_tokens=16)
    answer = qa.ask(small_document(), "Which city was the inventor of the thing born in?", level=3)
    assert [s["question"] for s in answer.steps] == ["step 1?", "step 2?"]
    assert runner.planner_turns == 3  # two tool calls, then one final answer without tools
    assert answer.answer == "The answer is in the tool results."
    assert answer.chunks_read > 0


def test_level_3_reads_the_document_once_for_a_question_asked_again(tiny_llm):
    runner = ScriptedPlanner(tiny_llm, ask=lambda turn: "Who found the key?" if turn < 3 else "who found the KEY")
    qa = DocQA(runner, budget=1024, retries=0, max_calls=3, quote_tokens=12, answer_tokens=16)
    doc = qa.document(small_document())
    answer = qa.ask(doc, "Where was the finder of the key born?", level=3)
    assert len(answer.steps) == 3 and len({s["answer"] for s in answer.steps}) == 1
    assert answer.chunks_read == len(doc.chunks(READING_CHUNK, OVERLAP))  # one reading, not three


class CutOffPlanner(ScriptedPlanner):
    """Its second call runs into the reply limit and never closes."""

    def chat(self, conversations, params, tools=None, progress=None, reply_start=""):
        if tools is not None and self.planner_turns == 1:
            self.planner_turns += 1
            return ['{"name": "read_document", "arguments": {"question": "Based on the evidence, the mentor was']
        return super().chat(conversations, params, tools, progress, reply_start)


def test_level_3_never_answers_with_a_cut_off_tool_call(tiny_llm):
    qa = DocQA(CutOffPlanner(tiny_llm), budget=1024, retries=0, max_calls=3, quote_tokens=12, answer_tokens=16)
    answer = qa.ask(small_document(), "Where was the finder of the key born?", level=3)
    assert len(answer.steps) == 1
    assert answer.answer == answer.steps[0]["answer"]  # the reading's answer, not the broken call's text


def test_level_3_always_asks_the_reader_at_least_once(tiny_llm):
    # the random model would never write a tool call; its first turn is begun as one for it
    qa = DocQA(tiny_llm, budget=1024, retries=0, max_calls=1, quote_tokens=4, answer_tokens=12)
    answer = qa.ask(small_document(), "Who was the mentor of the mentor of Hosalo?", level=3)
    assert len(answer.steps) == 1 and answer.chunks_read > 0


def test_level_3_renders_tool_calls_with_the_chat_template(default_tokenizer):
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "read_document", "arguments": {"question": "who?"}}}]},
        {"role": "tool", "content": "Ada."}]
    from qwen2.agent.docqa import READ_TOOL

    text = default_tokenizer.apply_chat_template(messages, tools=[READ_TOOL])
    assert '"name": "read_document"' in text and '{"question": "who?"}' in text and "<tool_response>" in text


def test_a_quote_must_come_from_its_passage():
    passage = "The secret passphrase for the vault is falcon-4821. The vault is in Bergen."
    assert parse_quote('{"res": "ans", "content": "The secret passphrase for the vault is falcon-4821."}',
                       passage) == "The secret passphrase for the vault is falcon-4821."
    assert parse_quote('{"res": "none"}', passage) is None
    assert parse_quote('{"res": "ans", "content": "Penguins live in Antarctica and eat krill."}', passage) is None
    assert parse_quote("None", passage) is None
    assert parse_quote("The vault is in Bergen.", passage) == "The vault is in Bergen."  # no JSON: the text


def test_a_misquote_becomes_the_sentence_it_was_taken_from():
    passage = ("The lighthouse was built in 1881. The access code for the teal door of the old lighthouse is 27086. "
               "Trains stop at the station twice a day.")
    needle = "The access code for the teal door of the old lighthouse is 27086."
    made_up = '{"res": "ans", "content": "The teal door of the old lighthouse is located at Shinjuku Station."}'
    assert parse_quote(made_up, passage) == needle
    assert parse_quote('{"res": "ans", "content": "27086"}', passage) == needle
    both = '{"res": "ans", "content": ["Trains stop at the station twice a day.", "The lighthouse was built in 1881."]}'
    assert parse_quote(both, passage) == "The lighthouse was built in 1881. Trains stop at the station twice a day."


def test_a_budget_over_the_context_is_refused(tiny_llm):
    with pytest.raises(OptionError, match="lower --budget or raise --ctx"):
        DocQA(tiny_llm, budget=8000)
    with pytest.raises(OptionError, match="level must be 1"):
        DocQA(tiny_llm, budget=1024).ask(small_document(), "q?", level=4)
