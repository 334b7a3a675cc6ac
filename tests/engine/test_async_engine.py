"""The async front door: concurrent streams equal their sequential twins; leaving early cancels."""

import asyncio

import pytest

from qwen2.engine.async_engine import AsyncEngine, QueueFullError
from qwen2.engine.engine import Engine
from qwen2.engine.sampling import SamplingParams
from qwen2.errors import RequestError

PROMPTS = [f"Item {i}: the quick brown fox" + " jumps" * i for i in range(6)]
GREEDY = dict(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture
def async_engine(tiny_model, default_tokenizer):
    engine = AsyncEngine(Engine(tiny_model, default_tokenizer, max_concurrency=4, max_seq_len=128), max_waiting=8)
    yield engine
    engine.shutdown()


async def collect(engine, prompt, **params):
    return [out.token async for out in engine.generate(prompt, SamplingParams(**params))]


def test_concurrent_streams_equal_sequential(async_engine, tiny_model, default_tokenizer):
    async def main():
        return await asyncio.gather(*(collect(async_engine, p, **GREEDY) for p in PROMPTS))

    concurrent = asyncio.run(main())
    for prompt, tokens in zip(PROMPTS, concurrent):
        alone = Engine(tiny_model, default_tokenizer, max_concurrency=1, max_seq_len=128)
        request = alone.submit(prompt, SamplingParams(**GREEDY))
        list(alone.stream(request))
        assert tokens == request.output
    assert async_engine.stats.finished == len(PROMPTS)


def test_closing_the_stream_cancels_the_request(async_engine):
    async def main():
        stream = async_engine.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
        await stream.__anext__()
        await stream.aclose()
        for _ in range(100):
            if async_engine.running == 0:
                return True
            await asyncio.sleep(0.01)
        return False

    assert asyncio.run(main())
    assert async_engine.stats.cancelled == {"caller": 1}


def test_invalid_request_raises_in_the_caller(async_engine):
    async def main():
        await collect(async_engine, "", **GREEDY)

    with pytest.raises(RequestError, match="empty"):
        asyncio.run(main())


def test_full_queue_is_refused(tiny_model, default_tokenizer):
    engine = AsyncEngine(Engine(tiny_model, default_tokenizer, max_concurrency=1, max_seq_len=128), max_waiting=0)
    try:
        with pytest.raises(QueueFullError):
            asyncio.run(collect(engine, "hello", **GREEDY))
    finally:
        engine.shutdown()
