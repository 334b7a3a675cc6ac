"""Request bodies into engine parameters, without a server."""

from qwen2.server.protocol import ChatRequest
from qwen2.tokenizer import QWEN_SAMPLING

MESSAGES = [{"role": "user", "content": "hi"}]


def test_fields_not_given_take_the_models_defaults_and_given_ones_win():
    model = QWEN_SAMPLING | {"temperature": 0.0, "top_k": 40}
    params = ChatRequest(messages=MESSAGES).sampling_params(1, 100, defaults=model)
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty) == (0.0, 0.8, 40, 1.05)
    params = ChatRequest(messages=MESSAGES, temperature=0.9, top_k=-1).sampling_params(1, 100, defaults=model)
    assert (params.temperature, params.top_k) == (0.9, 0)  # top_k -1 is off, as in vLLM
    params = ChatRequest(messages=MESSAGES).sampling_params(1, 100)
    assert (params.temperature, params.top_k, params.repetition_penalty) == (1.0, 0, 1.0)  # the engine's own
