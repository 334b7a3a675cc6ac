"""HF checkpoint folders: tiny random transformers models saved with save_pretrained
(single file and sharded) load to the same tensors; errors say what to do."""

import json

import pytest
import torch
from safetensors.torch import save_file

from qwen2.errors import ConfigError, WeightsError
from qwen2.weights.hf import load_hf, state_dict_keys

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
           mlp_only_layers=[1])


def per_expert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 keeps experts fused in memory (pitfall 13); spell them per expert."""
    out = {}
    for name, t in state.items():
        prefix, _, kind = name.rpartition(".")
        if kind == "gate_up_proj":
            for e, w in enumerate(t):
                gate, up = w.chunk(2)
                out[f"{prefix}.{e}.gate_proj.weight"], out[f"{prefix}.{e}.up_proj.weight"] = gate, up
        elif kind == "down_proj" and prefix.endswith("experts"):
            out |= {f"{prefix}.{e}.down_proj.weight": w for e, w in enumerate(t)}
        else:
            out[name] = t
    return out


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY)).eval()


@pytest.fixture(scope="module")
def moe():
    torch.manual_seed(0)
    return transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(**TINY, **MOE)).eval()


def assert_same(ours: dict[str, torch.Tensor], model) -> None:
    theirs = per_expert(model.state_dict())
    assert sorted(ours) == sorted(theirs)
    for name, t in theirs.items():
        assert torch.equal(ours[name], t), name


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_dense_round_trip(dense, tmp_path, shard):
    dense.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    if shard:
        assert (tmp_path / "model.safetensors.index.json").exists()
    config, sd = load_hf(tmp_path)
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (64, 2, 128)
    assert not config.tie_word_embeddings
    assert_same(sd, dense)
    assert sorted(sd) == sorted(state_dict_keys(config))


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_moe_round_trip(moe, tmp_path, shard):
    moe.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    config, sd = load_hf(tmp_path)
    assert config.is_moe and config.layer_is_sparse(0) and not config.layer_is_sparse(1)
    assert_same(sd, moe)
    assert sorted(sd) == sorted(state_dict_keys(config))


def test_fused_expert_names_are_split(moe, tmp_path):
    moe.config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in moe.state_dict().items()}, tmp_path / "model.safetensors")
    _, sd = load_hf(tmp_path)
    assert "model.layers.0.mlp.experts.gate_up_proj" not in sd
    assert_same(sd, moe)


def test_tied_drops_lm_head_and_casts(tmp_path):
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY, tie_word_embeddings=True))
    model.config.save_pretrained(tmp_path)
    save_file({k: v.clone() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    config, sd = load_hf(tmp_path, dtype=torch.bfloat16)
    assert config.tie_word_embeddings and "lm_head.weight" not in sd
    assert sd["model.norm.weight"].dtype == torch.bfloat16


def test_missing_config(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_hf(tmp_path)


def test_bin_weights_are_refused(dense, tmp_path):
    dense.config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(WeightsError, match=r"only PyTorch \.bin weights.*save_pretrained"):
        load_hf(tmp_path)
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(WeightsError, match="no \\*.safetensors weights"):
        load_hf(tmp_path)


def test_missing_shard(dense, tmp_path):
    dense.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    lost = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / lost).unlink()
    with pytest.raises(WeightsError, match=f"lacks shard.*{lost}"):
        load_hf(tmp_path)


def test_corrupt_safetensors(dense, tmp_path):
    dense.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        load_hf(tmp_path)


def test_missing_tensor(dense, tmp_path):
    dense.config.save_pretrained(tmp_path)
    state = {k: v.clone() for k, v in dense.state_dict().items() if "layers.1.mlp.up_proj" not in k}
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(WeightsError, match="lacks 1 tensor.*model.layers.1.mlp.up_proj.weight"):
        load_hf(tmp_path)
