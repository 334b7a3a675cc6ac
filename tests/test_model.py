"""Our Transformer equals transformers' Qwen2 / Qwen2-MoE on the same weights (fp32, CPU).

Each tiny random config is built in transformers, saved with save_pretrained, and the
saved tensors are loaded into our model, so the test also checks the naming contract.
"""

import pytest
import torch
from safetensors.torch import load_file

from qwen2.config import Qwen2Config
from qwen2.model import KVCache, Transformer

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            rope_theta=10000.0, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1)
CONFIGS = {
    "dense-tied": dict(TINY, tie_word_embeddings=True),
    "dense-untied": dict(TINY, tie_word_embeddings=False),
    "sliding-window": dict(TINY, tie_word_embeddings=False, use_sliding_window=True, sliding_window=5,
                           max_window_layers=1),
    "moe-shared-expert": dict(TINY, model_type="qwen2_moe", tie_word_embeddings=False, num_experts=8,
                              num_experts_per_tok=2, moe_intermediate_size=32,
                              shared_expert_intermediate_size=48, norm_topk_prob=False,
                              decoder_sparse_step=1, mlp_only_layers=[1]),
    "moe-normalised-topk": dict(TINY, model_type="qwen2_moe", tie_word_embeddings=False, num_experts=4,
                                num_experts_per_tok=2, moe_intermediate_size=32,
                                shared_expert_intermediate_size=32, norm_topk_prob=True),
}


def build_pair(name, tmp_path):
    cfg = dict(CONFIGS[name])
    torch.manual_seed(0)
    if cfg.get("model_type") == "qwen2_moe":
        ref = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(**cfg))
    else:
        ref = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**cfg, attn_implementation="eager"))
    with torch.no_grad():  # random biases and norms, so a dropped or misplaced one shows up
        for n, p in ref.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.normal_(0, 0.5 if "bias" in n else 0.1).add_(1.0 if "norm" in n else 0.0)
    ref.eval().save_pretrained(tmp_path)
    ours = Transformer.from_state_dict(Qwen2Config.from_hf_json(tmp_path), load_file(tmp_path / "model.safetensors"))
    return ref, ours


@pytest.mark.parametrize("name", CONFIGS)
def test_full_forward_matches_reference(name, tmp_path):
    ref, ours = build_pair(name, tmp_path)
    tokens = torch.randint(0, 256, (2, 17))
    with torch.no_grad():
        expected = ref(tokens).logits
        got = ours(tokens)
    assert (got - expected).abs().max() < 1e-4


@pytest.mark.parametrize("name", CONFIGS)
def test_cached_decode_matches_full_forward(name, tmp_path):
    ref, ours = build_pair(name, tmp_path)
    tokens = torch.randint(0, 256, (1, 20))
    cache = KVCache(ours.config, slots=1, max_len=32)
    with torch.no_grad():
        expected = ref(tokens).logits[0]
        prefill = ours(tokens[:, :12], torch.arange(12)[None], cache=cache)[0]
        steps = [ours(tokens[:, t:t + 1], torch.tensor([[t]]), cache=cache)[0, 0] for t in range(12, 20)]
    got = torch.cat([prefill, torch.stack(steps)])
    assert (got - expected).abs().max() < 1e-4


@pytest.mark.parametrize("name", CONFIGS)
def test_padded_batch_matches_each_sequence_alone(name, tmp_path):
    ref, ours = build_pair(name, tmp_path)
    lengths = [9, 4, 13]
    seqs = [torch.randint(0, 256, (n,)) for n in lengths]
    T = max(lengths)
    # reference: left padding with an attention mask, the way transformers batches
    left = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    # ours: right padding; a pad sits after every real token, so the causal rule hides it
    right = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        left[i, T - len(s):], mask[i, T - len(s):], right[i, :len(s)] = s, 1, s
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = KVCache(ours.config, slots=3, max_len=T + 4)
    with torch.no_grad():
        expected = ref(left, attention_mask=mask, position_ids=position_ids).logits
        got_full = ours(right)
        got_cached = ours(right, torch.arange(T).expand(3, T), cache=cache)
        for i, n in enumerate(lengths):
            assert (got_full[i, :n] - expected[i, T - n:]).abs().max() < 1e-4
            assert (got_cached[i, :n] - expected[i, T - n:]).abs().max() < 1e-4
        # one batched decode step, each sequence at its own position
        nxt = torch.randint(0, 256, (3, 1))
        step = ours(nxt, torch.tensor(lengths)[:, None], cache=cache)[:, 0]
        for i, s in enumerate(seqs):
            alone = ref(torch.cat([s, nxt[i]])[None]).logits[0, -1]
            assert (step[i] - alone).abs().max() < 1e-4


def test_moe_router_logits_are_returned_per_sparse_layer(tmp_path):
    _, ours = build_pair("moe-shared-expert", tmp_path)
    router_logits = []
    ours(torch.randint(0, 256, (2, 5)), router_logits=router_logits)
    assert [r.shape for r in router_logits] == [(10, 8), (10, 8)]  # layer 1 is dense (mlp_only_layers)


def test_tied_model_shares_embedding_and_head(tmp_path):
    _, ours = build_pair("dense-tied", tmp_path)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight


def with_config(model, **changes):
    """The same weights under a config override (rope scaling, DCA)."""
    import dataclasses

    other = Transformer.from_state_dict(dataclasses.replace(model.config, **changes),
                                        dict(model.state_dict()))
    return other


def test_dual_chunk_attention_equals_plain_attention_inside_one_chunk(tmp_path):
    _, ours = build_pair("dense-untied", tmp_path)
    dca = with_config(ours, dual_chunk_attention_config={"chunk_size": 32, "local_size": 8})
    tokens = torch.randint(0, 256, (2, 20))  # < chunk_len = 24
    with torch.no_grad():
        assert (dca(tokens) - ours(tokens)).abs().max() < 1e-4


def test_dual_chunk_attention_cached_decode_equals_full_forward(tmp_path):
    _, ours = build_pair("dense-untied", tmp_path)
    dca = with_config(ours, dual_chunk_attention_config={"chunk_size": 16, "local_size": 4},
                      max_position_embeddings=16)
    tokens = torch.randint(0, 256, (1, 50))  # four chunks of 12
    cache = KVCache(dca.config, slots=1, max_len=64)
    with torch.no_grad():
        full = dca(tokens)[0]
        prefill = dca(tokens[:, :30], torch.arange(30)[None], cache=cache)[0]
        steps = [dca(tokens[:, t:t + 1], torch.tensor([[t]]), cache=cache)[0, 0] for t in range(30, 50)]
        plain = ours(tokens)[0]
    assert (torch.cat([prefill, torch.stack(steps)]) - full).abs().max() < 1e-4
    assert (full[24:] - plain[24:]).abs().max() > 1e-3  # beyond two chunks DCA really remaps positions


def test_dynamic_ntk_matches_reference_beyond_the_trained_length(tmp_path):
    cfg = dict(CONFIGS["dense-untied"], max_position_embeddings=16, rope_scaling={"rope_type": "dynamic",
                                                                                   "factor": 2.0})
    torch.manual_seed(0)
    ref = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**cfg, attn_implementation="eager")).eval()
    ref.save_pretrained(tmp_path)
    ours = Transformer.from_state_dict(Qwen2Config.from_hf_json(tmp_path), load_file(tmp_path / "model.safetensors"))
    tokens = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        assert (ours(tokens) - ref(tokens).logits).abs().max() < 1e-4


ROUTINGS = ["spread", "all-to-one-pair", "ties"]


def routed_pair(routing: str, tmp_path):
    """transformers' Qwen2-MoE and ours on its weights, the router set up for `routing`: random
    (tokens spread, some experts empty), every token to experts 2 and 5 (the rest empty), or a
    zero router (every probability equal: top-k breaks the ties)."""
    ref, ours = build_pair("moe-shared-expert", tmp_path)
    with torch.no_grad():
        for model in (ref, ours):
            for layer in (0, 2):  # the sparse layers (layer 1 is dense)
                gate = model.model.layers[layer].mlp.gate.weight
                if routing == "all-to-one-pair":
                    gate.zero_()[[2, 5]] = 5.0
                elif routing == "ties":
                    gate.zero_()
    return ref, ours


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("rows", [1, 3, 40], ids=["decode", "few", "prefill"])
def test_grouped_experts_equal_the_per_expert_loop_and_transformers(routing, rows, tmp_path):
    ref, looped = routed_pair(routing, tmp_path)
    grouped = Transformer.from_state_dict(looped.config, looped.state_dict())
    assert grouped.fuse_weights() == [] and not looped.model.layers[0].mlp.grouped
    tokens = torch.randint(0, 256, (1, rows))
    with torch.no_grad():
        expected = ref(tokens).logits
        by_loop, by_groups = looped(tokens), grouped(tokens)
    assert (by_loop - expected).abs().max() < 1e-4
    assert (by_groups - expected).abs().max() < 1e-4
    assert (by_groups - by_loop).abs().max() < 1e-5


def test_grouping_keeps_the_parameters_and_training_reaches_them(tmp_path):
    _, model = routed_pair("spread", tmp_path)
    expert = model.model.layers[0].mlp.experts["3"]
    before = dict(model.named_parameters())
    model.fuse_weights()
    gate_up, down = model.model.layers[0].mlp.stacked
    assert dict(model.named_parameters()) == before  # the same objects: an optimizer's references hold
    assert expert.up_proj.weight.data_ptr() == gate_up[3, 32:].data_ptr()  # ...now views of the stacks
    assert expert.down_proj.weight.data_ptr() == down[3].data_ptr()
    model.train()
    tokens = torch.randint(0, 256, (2, 9))
    model(tokens).sum().backward()  # with gradients the experts run one by one through their own modules
    used = [e for e in range(8) if model.model.layers[0].mlp.experts[str(e)].down_proj.weight.grad is not None]
    assert used and all(model.model.layers[0].mlp.experts[str(e)].gate_proj.weight.grad.abs().sum() > 0 for e in used)
    with torch.no_grad():
        expert.down_proj.weight.mul_(2)  # an optimizer's in-place step lands in the stacks
    assert torch.equal(down[3], expert.down_proj.weight)


@pytest.mark.parametrize("name", CONFIGS)
def test_fused_projections_compute_what_the_separate_ones_do(name, tmp_path):
    ref, ours = build_pair(name, tmp_path)
    separate = Transformer.from_state_dict(ours.config, ours.state_dict())
    ours.fuse_weights()
    assert all(block.self_attn.fused for block in ours.model.layers)
    assert set(dict(ours.named_parameters())) == set(dict(separate.named_parameters()))  # the same names
    tokens = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        fused, unfused, expected = ours(tokens), separate(tokens), ref(tokens).logits
    assert (fused - unfused).abs().max() < 1e-5 and (fused - expected).abs().max() < 1e-4
    ours.to(torch.float64)  # new storage: the stacks are left behind and the layers compute on their own
    assert not ours.model.layers[0].self_attn.fused
    with torch.no_grad():
        assert (ours(tokens).float() - expected).abs().max() < 1e-4
