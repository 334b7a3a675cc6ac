"""Presets carry the published shapes; parameter counts equal the official recomputed numbers."""

import json

import pytest

from qwen2.config import PRESETS, Qwen2Config
from qwen2.errors import ConfigError

OFFICIAL_TOTALS = {
    "Qwen2-0.5B": 494_032_768,
    "Qwen2-1.5B": 1_543_714_304,
    "Qwen2-7B": 7_615_616_512,
    "Qwen2-57B-A14B": 57_408_658_944,
    "Qwen2-72B": 72_706_203_648,
}


@pytest.mark.parametrize("name, total", OFFICIAL_TOTALS.items())
def test_preset_parameter_counts_equal_official(name, total):
    assert Qwen2Config.from_preset(name).num_params()["total"] == total


def test_moe_active_and_non_embedding_counts():
    counts = Qwen2Config.from_preset("Qwen2-57B-A14B").num_params()
    assert counts["active"] == 14_249_270_784
    assert counts["non_embedding"] == 56_319_581_696
    assert Qwen2Config.from_preset("Qwen2-0.5B").num_params()["non_embedding"] == 357_898_112


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_is_consistent(name):
    config = Qwen2Config.from_preset(name)
    assert config.num_attention_heads % config.num_key_value_heads == 0
    assert config.head_dim * config.num_attention_heads == config.hidden_size
    counts = config.num_params()
    assert counts["active"] <= counts["total"]


def test_matches_transformers_parameter_count_on_a_tiny_moe():
    transformers = pytest.importorskip("transformers")
    fields = dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                  moe_intermediate_size=16, shared_expert_intermediate_size=24, mlp_only_layers=[1],
                  tie_word_embeddings=False)
    reference = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(**fields))
    ours = Qwen2Config(model_type="qwen2_moe", **fields)
    assert ours.num_params()["total"] == sum(p.numel() for p in reference.parameters())


def test_from_hf_json_ignores_unknown_keys_and_reads_rope_parameters(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
        "some_future_field": 1, "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0}}))
    config = Qwen2Config.from_hf_json(tmp_path)
    assert config.rope_theta == 5000.0 and config.head_dim == 16 and config.rope_scaling is None


def test_sliding_window_layers_follow_each_model_type():
    dense = Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=8, max_window_layers=2)
    assert [dense.layer_window(i) for i in range(4)] == [None, None, 8, 8]
    moe = Qwen2Config(model_type="qwen2_moe", num_hidden_layers=4, use_sliding_window=True, sliding_window=8,
                      max_window_layers=3, num_experts=2, num_experts_per_tok=1)
    assert [moe.layer_window(i) for i in range(4)] == [8, None, 8, None]
    assert Qwen2Config(sliding_window=8).layer_window(0) is None  # use_sliding_window is off


@pytest.mark.parametrize("bad, message", [
    ({"model_type": "llama"}, "unsupported model_type 'llama'"),
    ({"num_attention_heads": 14, "num_key_value_heads": 3}, "multiple of num_key_value_heads"),
])
def test_bad_configs_are_refused_with_a_reason(bad, message):
    with pytest.raises(ConfigError, match=message):
        Qwen2Config.from_dict(bad)


def test_missing_or_corrupt_config_json(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        Qwen2Config.from_hf_json(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Qwen2Config.from_hf_json(tmp_path)


def test_a_preset_is_named_in_any_case():
    assert Qwen2Config.from_preset("qwen2-72b") == Qwen2Config.from_preset("Qwen2-72B")
    assert Qwen2Config.from_preset(" QWEN2-57B-A14B ").num_experts == 64


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="Qwen2-7B"):
        Qwen2Config.from_preset("Qwen9-1T")
