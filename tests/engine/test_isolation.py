"""One bad request never hurts another: failures stay with their request, stop strings cost only
the new text, the engine thread survives its callers, abandoned work is cancelled at once."""

import asyncio
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen2.engine.async_engine import AsyncEngine, EngineUnavailableError
from qwen2.engine.engine import Engine
from qwen2.engine.llm import LLM
from qwen2.engine.sampling import SamplingParams
from qwen2.engine.stops import StopMatcher
from qwen2.errors import RequestError

GREEDY = dict(temperature=0, max_tokens=6, ignore_eos=True)
PROMPT, OTHER = "The quick brown fox", "Once upon a time"


def alone(tiny_model, tokenizer, prompt: str) -> list[int]:
    engine = Engine(tiny_model, tokenizer, max_concurrency=1, max_seq_len=128)
    request = engine.submit(prompt, SamplingParams(**GREEDY))
    list(engine.stream(request))
    return request.output


def drain(engine: Engine) -> list:
    outputs = []
    while engine.has_work:
        outputs += engine.step()
    return outputs


@pytest.mark.parametrize("field, value", [
    ("temperature", 1e-40), ("temperature", math.nan), ("temperature", math.inf), ("repetition_penalty", 1e-300),
    ("repetition_penalty", math.nan), ("top_p", math.nan), ("min_p", -math.inf), ("presence_penalty", math.inf),
    ("logit_bias", {5: math.nan}), ("logit_bias", {i: 1.0 for i in range(301)}), ("stop", ["x" * 40_000]),
    ("stop", ["a"] * 17), ("stop", [""]), ("seed", 2**64), ("stop_token_ids", [-1]),
])
def test_values_that_would_overflow_or_give_nan_are_refused(tiny_model, default_tokenizer, field, value):
    engine = Engine(tiny_model, default_tokenizer, max_concurrency=1, max_seq_len=64)
    with pytest.raises(RequestError, match=field.split("_")[0]):
        engine.submit(PROMPT, SamplingParams(**{field: value}))


def test_a_failure_while_sampling_ends_that_request_alone(tiny_model, default_tokenizer):
    def broken(generated, logits):
        if len(generated) == 2:
            raise ValueError("processor exploded")
        return logits

    engine = Engine(tiny_model, default_tokenizer, max_concurrency=2, max_seq_len=128)
    bad = engine.submit(PROMPT, SamplingParams(**GREEDY, logits_processors=[broken]))
    good = engine.submit(OTHER, SamplingParams(**GREEDY))
    outputs = drain(engine)
    last_of_bad = [o for o in outputs if o.request_id == bad.id][-1]
    assert last_of_bad.finish_reason == "error" and "sampling" in last_of_bad.error
    assert "processor exploded" in last_of_bad.error
    assert bad.finish_reason == "error" and len(bad.output) == 2
    assert good.finish_reason == "length" and good.output == alone(tiny_model, default_tokenizer, OTHER)


def test_a_failure_in_detokenizing_ends_that_request_alone(tiny_model, default_tokenizer):
    engine = Engine(tiny_model, default_tokenizer, max_concurrency=2, max_seq_len=128)
    bad = engine.submit(PROMPT, SamplingParams(**GREEDY))
    good = engine.submit(OTHER, SamplingParams(**GREEDY))

    def push(token):  # a stand-in for a decoder bug: no real input makes StreamDecoder raise
        raise UnicodeError("cannot decode")

    bad.detok.push = push
    drain(engine)
    assert bad.finish_reason == "error" and bad.failed_in == "detokenizing"
    assert good.output == alone(tiny_model, default_tokenizer, OTHER)


def naive_cut(text: str, stops: list[str]) -> int | None:
    """Where the text is cut: the start of the stop string that completes first (earliest end)."""
    ends = [(text.find(s) + len(s), -len(s)) for s in stops if s in text]
    if not ends:
        return None
    end, negative_length = min(ends)
    return end + negative_length


@settings(max_examples=500, deadline=None)
@given(pieces=st.lists(st.text("ab\n", max_size=6), max_size=12),
       stops=st.lists(st.text("ab\n", min_size=1, max_size=5), min_size=1, max_size=3))
def test_stop_matching_agrees_with_a_plain_search(pieces, stops):
    matcher, text = StopMatcher(stops), ""
    for piece in pieces:
        start = matcher.feed(piece)
        if start is not None:
            cut = len(text) + start
            assert cut == naive_cut(text + piece, stops)
            return
        text += piece
        held = matcher.partial
        assert any(s.startswith(text[len(text) - held:]) for s in stops) or held == 0
        assert not any(text.endswith(s[:n]) for s in stops for n in range(held + 1, len(s)))
    assert naive_cut(text, stops) is None


def test_a_long_stop_string_that_almost_matches_everywhere_is_held_and_found():
    stop = "a" * 999 + "b"
    matcher = StopMatcher([stop])
    for _ in range(2000):  # each piece advances the automaton by its own characters only
        assert matcher.feed("a") is None
    assert matcher.partial == 999  # the text that may begin the stop string is held back
    assert matcher.feed("b") == -999


def test_breaking_out_of_a_sync_stream_frees_the_slot_at_once(tiny_model, default_tokenizer):
    engine = Engine(tiny_model, default_tokenizer, max_concurrency=1, max_seq_len=256)
    llm = LLM(tiny_model, default_tokenizer, engine)
    for _ in llm.generate(PROMPT, stream=True, temperature=0, max_tokens=200, ignore_eos=True):
        break
    assert not engine.has_work  # no step decodes it on
    stream = llm.generate(PROMPT, stream=True, temperature=0, max_tokens=200, ignore_eos=True)
    del stream  # dropped before its first piece
    assert not engine.has_work
    stream = llm.generate(PROMPT, stream=True, temperature=0, max_tokens=200, ignore_eos=True)
    next(stream)
    stream.close()
    assert not engine.has_work
    assert llm.generate(OTHER, **GREEDY).tokens == alone(tiny_model, default_tokenizer, OTHER)


@pytest.fixture
def async_engine(tiny_model, default_tokenizer):
    engine = AsyncEngine(Engine(tiny_model, default_tokenizer, max_concurrency=2, max_seq_len=256))
    yield engine
    engine.shutdown()


async def collect(engine: AsyncEngine, prompt: str, **params) -> list:
    return [out async for out in engine.generate(prompt, SamplingParams(**(GREEDY | params)))]


def test_a_caller_whose_event_loop_is_gone_does_not_stop_the_engine(async_engine, tiny_model, default_tokenizer):
    loop = asyncio.new_event_loop()
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    loop.run_until_complete(async_engine.submit(PROMPT, long))
    loop.close()  # gone without closing its stream: the engine cannot deliver to it any more
    outputs = asyncio.run(collect(async_engine, OTHER))
    assert [o.token for o in outputs] == alone(tiny_model, default_tokenizer, OTHER)
    assert async_engine.alive and async_engine.running == 0
    assert async_engine.stats.cancelled["caller_gone"] == 1


def test_cancelling_the_awaiting_task_frees_the_slot(async_engine):
    async def main() -> bool:
        task = asyncio.create_task(collect(async_engine, PROMPT, max_tokens=200))
        while async_engine.running == 0:
            await asyncio.sleep(0.01)
        task.cancel()
        for _ in range(200):
            if async_engine.running == 0:
                return True
            await asyncio.sleep(0.01)
        return False

    assert asyncio.run(main())


def test_an_error_outside_any_request_fails_those_in_flight_and_the_engine_serves_on(async_engine, tiny_model,
                                                                                      default_tokenizer):
    step = async_engine.engine.step
    calls = 0

    def failing_once():  # stands in for an engine bug; no real input reaches this path any more
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("engine bug")
        return step()

    async_engine.engine.step = failing_once
    failed = asyncio.run(collect(async_engine, PROMPT))
    assert failed[-1].finish_reason == "error" and failed[-1].error
    assert async_engine.stats.failed["internal"] == 1 and async_engine.alive
    assert [o.token for o in asyncio.run(collect(async_engine, OTHER))] == alone(tiny_model, default_tokenizer, OTHER)


def test_shutdown_ends_every_open_request_with_a_final_output(async_engine):
    async def main() -> list:
        stream = async_engine.generate(PROMPT, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
        outputs = [await stream.__anext__()]
        await asyncio.get_running_loop().run_in_executor(None, async_engine.shutdown)
        outputs += [out async for out in stream]
        return outputs

    outputs = asyncio.run(main())
    assert outputs[-1].finish_reason == "error" and "shutting down" in outputs[-1].error
    assert not async_engine.alive
    with pytest.raises(EngineUnavailableError):
        asyncio.run(collect(async_engine, OTHER))


def test_a_failed_forward_ends_the_requests_in_it_and_the_engine_serves_on(tiny_model, default_tokenizer):
    engine = Engine(tiny_model, default_tokenizer, max_concurrency=2, max_seq_len=128)
    forwards = engine._forward, engine._forward_rows  # a prompt's own forward; a decode step's

    def out_of_memory(*args, **kwargs):  # stands in for a real allocation failure, which cannot be provoked here
        raise MemoryError("no room for the batch")

    first = engine.submit(PROMPT, SamplingParams(**GREEDY))
    engine.step()  # prefilled, decoding
    engine._forward = engine._forward_rows = out_of_memory
    outputs = engine.step()
    assert [o.finish_reason for o in outputs] == ["error"] and "forward" in outputs[0].error
    assert first.failed_in == "forward" and not engine.has_work
    engine._forward, engine._forward_rows = forwards
    later = engine.submit(OTHER, SamplingParams(**GREEDY))
    drain(engine)
    assert later.output == alone(tiny_model, default_tokenizer, OTHER)
