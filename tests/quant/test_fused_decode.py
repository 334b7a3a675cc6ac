"""The fused decode step: a decode step's layers as one compiled call give the logits and the
greedy tokens of the model's own layers, for one row and for a batch of rows of different lengths;
models it does not cover (MoE, sliding windows, DCA, float32 activations) keep their own code."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qwen2.model import PagedKVCache, Transformer
from qwen2.quant.blocks import Q8_0, blocks_from_float, kernels_available
from qwen2.quant.fused_decode import FusedDecode, _linears, fusable
from tests.conftest import tiny_config

pytestmark = pytest.mark.skipif(not kernels_available(), reason="the GGUF kernels cannot be built on this machine")
BLOCK, MAX_LEN = 16, 384


def build(activations: str = "int8", **overrides) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=512, **overrides)).eval()
    blocks_from_float(model, Q8_0, activations=activations)
    model.decode_step = FusedDecode.for_model(model)
    return model


def greedy(model: Transformer, prompts: list[list[int]], steps: int) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Each prompt prefilled alone, then `steps` decode steps of all rows together (paged cache)."""
    per_slot = MAX_LEN // BLOCK
    cache = PagedKVCache(model.config, 1 + per_slot * len(prompts), BLOCK, len(prompts), MAX_LEN)
    cache.zero_blocks(list(range(cache.blocks)))  # as the engine hands blocks out: masked keys must be finite
    for r in range(len(prompts)):  # block 0 is the padding block: nobody's
        cache.tables[r] = torch.arange(1 + r * per_slot, 1 + (r + 1) * per_slot)
    tokens = []
    with torch.no_grad():
        for r, prompt in enumerate(prompts):
            n = len(prompt)
            logits = model(torch.tensor([prompt]), torch.arange(n)[None], cache=cache, slots=torch.tensor([r]),
                           logits_index=torch.tensor([n - 1]))
            tokens.append([int(logits.argmax())])
        steps_logits = []
        for _ in range(steps):
            rows = len(prompts)
            positions = torch.tensor([[len(p) + len(t) - 1] for p, t in zip(prompts, tokens)])
            logits = model(torch.tensor([[t[-1]] for t in tokens]), positions, cache=cache,
                           slots=torch.arange(rows), logits_index=torch.zeros(rows, dtype=torch.long))
            steps_logits.append(logits)
            for r in range(rows):
                tokens[r].append(int(logits[r].argmax()))
    return steps_logits, tokens


@pytest.mark.parametrize("prompts", [[[5, 9, 11, 200, 3]], [[5, 9, 11], list(range(40, 77)), [300] * 18],
                                     [[5, 9], [t * 7 % 500 for t in range(300)]]],
                         ids=["one row", "three rows of different lengths", "a row past 256 keys (a chunk of them)"])
def test_the_fused_step_equals_the_models_own_layers(prompts, isa):
    model = build()
    assert model.decode_step is not None
    fused_logits, fused_tokens = greedy(model, prompts, 64)
    model.decode_step = None
    own_logits, own_tokens = greedy(model, prompts, 64)
    # Float32 rounding apart (~1e-7 of the logits), except where a last-bit difference in a norm or
    # an attention output lands an activation on the other side of an int8 rounding step: that
    # moves it by max|x|/127 of its run, the logits by well under 1%, and later steps read the moved
    # keys and values (~1e-6).
    errors = torch.tensor([((got - want).abs().max() / want.abs().max()).item()
                           for got, want in zip(fused_logits, own_logits)])
    assert errors.max() < 1e-2 and errors.median() < 1e-5, errors
    assert fused_tokens == own_tokens


def test_the_stack_refuses_a_layer_of_another_size():
    """One step's buffers serve every layer, so a layer that does not fit them is refused when it is added."""
    stack = build().decode_step.stack
    block = build(intermediate_size=256).model.layers[0]
    linears = _linears(block)
    with pytest.raises(RuntimeError, match="same hidden and intermediate sizes"):
        stack.add_layer(block.input_layernorm.weight, block.post_attention_layernorm.weight,
                        block.input_layernorm.eps, [m.packed for m in linears], [m.qtype for m in linears],
                        [m.bias if m.bias is not None else torch.empty(0) for m in linears])


def test_the_fused_call_runs_for_decode_steps_only(monkeypatch):
    model = build()
    calls = []
    monkeypatch.setattr(FusedDecode, "__call__", lambda self, x, ctx: calls.append(x.shape) or torch.zeros_like(x))
    greedy(model, [[5, 9, 11]], 2)
    assert calls == [(1, 1, 64), (1, 1, 64)]  # not the prefill, and not a forward without a paged cache
    with torch.no_grad():
        model(torch.tensor([[5]]))
    assert len(calls) == 2


@pytest.mark.parametrize("overrides", [
    dict(model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
         shared_expert_intermediate_size=64),
    dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),
    dict(hidden_size=96, num_attention_heads=4, num_key_value_heads=2),  # heads of 24: no register-held build
], ids=["moe", "sliding window", "head size 24"])
def test_models_it_does_not_cover_keep_their_own_layers(overrides):
    model = build(**overrides)
    assert not fusable(model) and model.decode_step is None
    logits, tokens = greedy(model, [[5, 9, 11, 12]], 4)
    assert len(tokens[0]) == 5 and torch.isfinite(logits[-1]).all()


def test_float32_activations_and_dca_keep_their_own_layers():
    assert build(activations="float32").decode_step is None
    model = build()
    own = build()
    own.decode_step = None
    dca = {"chunk_size": 32, "local_size": 8, "original_max_position_embeddings": 512}
    for m in (model, own):
        m.set_rope(dataclasses.replace(m.config, dual_chunk_attention_config=dca))
    assert model.decode_step is not None  # the model qualifies, yet a DCA step is not the fused kernel's
    got, want = greedy(model, [[5, 9, 11, 12]], 8), greedy(own, [[5, 9, 11, 12]], 8)
    assert got[1] == want[1] and all(torch.equal(a, b) for a, b in zip(got[0], want[0]))
