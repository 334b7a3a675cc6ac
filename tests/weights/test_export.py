"""export_hf round trips: a tiny model written by us is loaded by transformers (same tensors
and config, tied head re-tied) and by load_hf."""

import json

import pytest
import torch
from safetensors import safe_open
from tokenizers import pre_tokenizers

from qwen2.config import Qwen2Config
from qwen2.tokenizer import Tokenizer
from qwen2.weights.export import export_hf
from qwen2.weights.hf import load_hf

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0, eos_token_id=258,
            bos_token_id=256)
MOE = dict(model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
           shared_expert_intermediate_size=48)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """Byte-level tokens only, plus Qwen2's three control tokens (ids 256-258)."""
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet()) + ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    return Tokenizer.from_gguf_metadata({
        "general.architecture": "qwen2", "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": [], "tokenizer.ggml.token_type": [1] * 256 + [3] * 3,
        "tokenizer.ggml.eos_token_id": 258, "tokenizer.ggml.bos_token_id": 256,
        "tokenizer.ggml.padding_token_id": 256,
    })


def random_state(config: Qwen2Config) -> dict[str, torch.Tensor]:
    """Our config's tensors, via a transformers model built from its exported config."""
    torch.manual_seed(0)
    hf_config = transformers.AutoConfig.for_model(**config.to_hf_dict())
    model = transformers.AutoModelForCausalLM.from_config(hf_config)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def per_expert(state):
    out = {}
    for name, t in state.items():
        prefix, _, kind = name.rpartition(".")
        if kind == "gate_up_proj":
            for e, w in enumerate(t):
                out[f"{prefix}.{e}.gate_proj.weight"], out[f"{prefix}.{e}.up_proj.weight"] = w.chunk(2)
        elif kind == "down_proj" and prefix.endswith("experts"):
            out |= {f"{prefix}.{e}.down_proj.weight": w for e, w in enumerate(t)}
        else:
            out[name] = t
    return out


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("moe", [False, True])
def test_transformers_loads_export(tmp_path, tokenizer, tied, moe):
    config = Qwen2Config(**TINY, tie_word_embeddings=tied, **(MOE if moe else {}))
    state = per_expert(random_state(config))
    if tied:
        del state["lm_head.weight"]
    export_hf(config, state, tokenizer, tmp_path)

    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    theirs = per_expert(model.state_dict())
    if tied:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        with safe_open(tmp_path / "model.safetensors", "pt") as f:
            assert "lm_head.weight" not in f.keys()
        theirs.pop("lm_head.weight")
    assert sorted(theirs) == sorted(state)
    for name, t in state.items():
        assert torch.equal(theirs[name], t), name
    assert model.config.rope_parameters["rope_theta"] == 10000.0 and model.config.rms_norm_eps == 1e-6

    config2, state2 = load_hf(tmp_path)
    assert config2 == config
    assert all(torch.equal(state2[k], v) for k, v in state.items())


def test_tokenizer_and_generation_config(tmp_path, tokenizer):
    config = Qwen2Config(**TINY)
    export_hf(config, random_state(config), tokenizer, tmp_path)
    generation = transformers.GenerationConfig.from_pretrained(tmp_path)
    assert generation.eos_token_id == [258, 256]  # <|im_end|> and <|endoftext|>
    assert (generation.bos_token_id, generation.pad_token_id) == (256, 256)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf_tok.encode("héllo<|im_end|>") == tokenizer.encode("héllo<|im_end|>")

    export_hf(config, random_state(config), tokenizer, tmp_path, generation_config={"eos_token_id": 7})
    assert json.loads((tmp_path / "generation_config.json").read_text()) == {"eos_token_id": 7}


def test_bfloat16_export(tmp_path, tokenizer):
    config = Qwen2Config(**TINY)
    state = {k: v.bfloat16() for k, v in random_state(config).items()}
    export_hf(config, state, tokenizer, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.dtype == torch.bfloat16
