"""A suffix (fill in the middle) needs the model's FIM tokens: a model without them is told so."""

import openai
import pytest

from qwen2.server.app import Settings
from tests.server.test_docqa import serving


def test_a_suffix_on_a_model_without_fim_tokens_is_a_400_naming_suffix(byte_tokenizer):
    with serving(byte_tokenizer, Settings()) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny", prompt="def f(x):", suffix="return y", max_tokens=4)
        assert e.value.body["param"] == "suffix" and "<|fim_prefix|>" in e.value.body["message"]
        assert client.completions.create(model="tiny", prompt="def f(x):", max_tokens=2).choices[0].text is not None
