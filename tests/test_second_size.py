"""A second real size: Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF, 1.1 GB, head dim 128) loads and
its greedy tokens match transformers on the same file. Slow (`make test-slow`)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def path():
    from qwen2.weights.default import CODER_1_5B, packed_model_path

    return packed_model_path(CODER_1_5B)


def test_greedy_tokens_match_transformers(path):
    from qwen2 import load

    llm = load(path, dtype="float32", device="cpu", quant="none", max_concurrency=1, ctx=512)
    assert (llm.config.hidden_size, llm.config.num_hidden_layers, llm.config.head_dim) == (1536, 28, 128)
    reference = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                  dtype=torch.float32).eval()
    for prompt in ("def fibonacci(n):", "快速排序的原理是"):
        ids = llm.tokenizer.encode(prompt)
        with torch.no_grad():
            expected = reference.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                                          eos_token_id=None)[0, len(ids):].tolist()
            diff = (llm.model(torch.tensor([ids]))[0, -1] - reference(torch.tensor([ids])).logits[0, -1]).abs().max()
        print(f"{prompt!r}: max |logit diff| = {diff:.2e}")
        assert llm.generate(ids, max_tokens=24, temperature=0, ignore_eos=True).tokens == expected
