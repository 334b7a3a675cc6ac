"""RoPE scalings equal transformers' rope init functions, and a YaRN model equals transformers' logits."""

import json

import pytest
import torch
from safetensors.torch import load_file

from qwen2.config import Qwen2Config
from qwen2.errors import ConfigError
from qwen2.model import Transformer
from qwen2.rope import (
    describe_rope,
    dynamic_inv_freq,
    effective_context,
    parse_rope_scaling,
    rope_parameters,
    rope_type,
)

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

THETA = 1_000_000.0


def configs(head_dim, max_pos, scaling):
    """(ours, transformers') with the same shape and rope scaling; 2 heads of head_dim."""
    shape = dict(hidden_size=2 * head_dim, num_attention_heads=2, num_key_value_heads=1,
                 max_position_embeddings=max_pos)
    ours = Qwen2Config(**shape, rope_theta=THETA, rope_scaling=dict(scaling) if scaling else None)
    theirs = transformers.Qwen2Config(**shape, rope_parameters=dict(scaling or {}, rope_theta=THETA))
    return ours, theirs


def reference(theirs, **kw):
    return ROPE_INIT_FUNCTIONS[theirs.rope_parameters["rope_type"]](theirs, **kw)


YARN_VARIANTS = {
    "plain": {},
    "betas": {"beta_fast": 16, "beta_slow": 2},
    "attention-factor": {"attention_factor": 1.25},
    "mscale": {"mscale": 0.707, "mscale_all_dim": 1.0},
    "no-truncate": {"truncate": False},
}


@pytest.mark.parametrize("variant", YARN_VARIANTS)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("factor", [2, 4, 8])
def test_yarn_matches_transformers(factor, head_dim, variant):
    original = 32768
    scaling = {"rope_type": "yarn", "factor": float(factor), "original_max_position_embeddings": original}
    ours, theirs = configs(head_dim, factor * original, scaling | YARN_VARIANTS[variant])
    inv_freq, attn = rope_parameters(ours)
    ref_freq, ref_attn = reference(theirs)
    assert inv_freq.shape == (head_dim // 2,)
    torch.testing.assert_close(inv_freq, ref_freq, rtol=1e-6, atol=0)
    assert attn == pytest.approx(ref_attn, rel=1e-12)
    assert effective_context(ours) == factor * original


def test_yarn_legacy_type_key_and_worked_numbers():
    # the model-card snippet spells the kind as "type"
    ours, _ = configs(128, 131072, {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})
    inv_freq, attn = rope_parameters(ours)
    assert attn == pytest.approx(1.138629, abs=1e-6)  # 0.1 ln 4 + 1
    base = 1.0 / THETA ** (torch.arange(0, 128, 2).float() / 128)
    # reference section 3.2: low 23, high 40 for head_dim 128 -> slots < 23 kept, > 40 divided by 4
    torch.testing.assert_close(inv_freq[:23], base[:23])
    torch.testing.assert_close(inv_freq[41:], base[41:] / 4)


@pytest.mark.parametrize("factor", [2.0, 4.0])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_linear_matches_transformers(factor, head_dim):
    ours, theirs = configs(head_dim, 4096, {"rope_type": "linear", "factor": factor})
    inv_freq, attn = rope_parameters(ours)
    ref_freq, ref_attn = reference(theirs)
    torch.testing.assert_close(inv_freq, ref_freq, rtol=1e-6, atol=0)
    assert attn == ref_attn == 1.0
    assert effective_context(ours) == int(factor * 4096)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_default_matches_transformers(head_dim):
    ours, theirs = configs(head_dim, 4096, None)
    inv_freq, attn = rope_parameters(ours)
    ref_freq, ref_attn = transformers.models.qwen2.modeling_qwen2.Qwen2RotaryEmbedding.compute_default_rope_parameters(
        theirs)
    torch.testing.assert_close(inv_freq, ref_freq, rtol=1e-6, atol=0)
    assert attn == ref_attn == 1.0
    assert effective_context(ours) == 4096


@pytest.mark.parametrize("seq_len", [100, 4096, 4097, 10000, 50000])
def test_dynamic_ntk_matches_transformers(seq_len):
    ours, theirs = configs(128, 4096, {"rope_type": "dynamic", "factor": 2.0})
    inv_freq, attn = rope_parameters(ours)
    torch.testing.assert_close(inv_freq, reference(theirs)[0], rtol=1e-6, atol=0)  # unscaled at load
    torch.testing.assert_close(dynamic_inv_freq(ours, seq_len), reference(theirs, seq_len=seq_len)[0],
                               rtol=1e-6, atol=0)
    if seq_len <= 4096:
        torch.testing.assert_close(dynamic_inv_freq(ours, seq_len), inv_freq)


def test_explicit_yarn_factor_wins_when_max_position_embeddings_disagrees():
    """transformers #38224: some versions replaced `factor` by max_position_embeddings / original.

    With Qwen's model-card snippet (max 32768 = original 32768, factor 4) that ratio is 1, and
    with max 131072 / original 32768 / factor 2 it is 4. We always use the explicit factor.
    """
    explicit_4, _ = configs(128, 4 * 32768, {"rope_type": "yarn", "factor": 4.0,
                                             "original_max_position_embeddings": 32768})
    card, _ = configs(128, 32768, {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})
    torch.testing.assert_close(rope_parameters(card)[0], rope_parameters(explicit_4)[0])
    assert rope_parameters(card)[1] == pytest.approx(1.138629, abs=1e-6)
    assert effective_context(card) == 131072

    ours, theirs = configs(128, 131072, {"rope_type": "yarn", "factor": 2.0,
                                         "original_max_position_embeddings": 32768})
    consistent_2, _ = configs(128, 65536, {"rope_type": "yarn", "factor": 2.0,
                                           "original_max_position_embeddings": 32768})
    torch.testing.assert_close(rope_parameters(ours)[0], rope_parameters(consistent_2)[0])
    torch.testing.assert_close(rope_parameters(ours)[0], reference(theirs)[0])  # this transformers agrees
    assert effective_context(ours) == 65536


def test_yarn_without_original_falls_back_to_max_position_embeddings():
    ours, _ = configs(64, 32768, {"rope_type": "yarn", "factor": 4.0})
    explicit, _ = configs(64, 32768, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})
    torch.testing.assert_close(rope_parameters(ours)[0], rope_parameters(explicit)[0])
    assert effective_context(ours) == 131072
    assert "yarn factor 4" in describe_rope(ours)


@pytest.mark.parametrize("scaling, words", [
    ({"rope_type": "longrope", "factor": 2.0}, ["'longrope'", "default", "linear", "dynamic", "yarn"]),
    ({"type": "su"}, ["'su'", "yarn"]),
    ({"rope_type": "linear"}, ["'linear'", "'factor'"]),
    ({"rope_type": "yarn", "factor": "four"}, ["'yarn'", "'factor'"]),
    ({"rope_type": "dynamic", "factor": -1}, ["'dynamic'", "'factor'"]),
])
def test_bad_rope_scaling_is_a_config_error(scaling, words):
    ours, _ = configs(64, 4096, None)
    ours.rope_scaling = scaling
    with pytest.raises(ConfigError) as e:
        rope_parameters(ours)
    assert all(w in str(e.value) for w in words)


@pytest.mark.parametrize("spec, expected", [
    ("yarn:4", {"rope_type": "yarn", "factor": 4.0}),
    ("YaRN:4:32768", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),
    ("linear:2", {"rope_type": "linear", "factor": 2.0}),
    ("dynamic:1.5", {"rope_type": "dynamic", "factor": 1.5}),
    ("none", {"rope_type": "default"}),
    ("default", {"rope_type": "default"}),
])
def test_parse_rope_scaling(spec, expected):
    assert parse_rope_scaling(spec) == expected
    ours, _ = configs(64, 32768, None)
    ours.rope_scaling = parse_rope_scaling(spec)
    rope_parameters(ours)  # every parsed spec is accepted by the config path
    assert rope_type(ours) == expected["rope_type"]


@pytest.mark.parametrize("spec", ["yarn", "yarn:", "yarn:x", "yarn:0.5", "yarn:4:abc", "yarn:4:0", "yarn:4:1:2",
                                  "linear:2:4096", "ntk:2", "", "none:2", "yarn:nan"])
def test_parse_rope_scaling_rejects_bad_specs(spec):
    with pytest.raises(ConfigError, match="bad rope scaling"):
        parse_rope_scaling(spec)


def test_yarn_model_logits_match_transformers(tmp_path):
    # original 32 and positions up to 47, so both the ramp and the long range are exercised
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 8}
    cfg = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False,
               bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    ref = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **cfg, rope_parameters=scaling | {"rope_theta": 10000.0}, attn_implementation="eager")).eval()
    ref.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["rope_parameters"]["rope_type"] == "yarn"
    config = Qwen2Config.from_hf_json(tmp_path)
    assert rope_type(config) == "yarn" and config.rope_theta == 10000.0
    ours = Transformer.from_state_dict(config, load_file(tmp_path / "model.safetensors"))
    assert ours.attention_scaling == pytest.approx(1.138629, abs=1e-6)
    tokens = torch.randint(0, 256, (2, 48))
    with torch.no_grad():
        expected, got = ref(tokens).logits, ours(tokens)
    assert (got - expected).abs().max() < 1e-4
    # and the scaling matters: the same weights without it give different logits
    plain = Transformer.from_state_dict(Qwen2Config.from_dict(config.to_hf_dict() | {"rope_scaling": None}),
                                        load_file(tmp_path / "model.safetensors"))
    with torch.no_grad():
        assert (plain(tokens) - expected).abs().max() > 1e-3
