"""The fused prefill: a many-row forward of an int8-block model as a few bf16 GEMMs a layer (q/k/v
as one, gate/up as one, SiLU-times-up compiled) gives the logits and greedy tokens of the model's own
layers, including a second chunk that attends to the first through the cache, with AMX attention on our
tiles; SiLU-times-up on bf16
equals torch's float32 computation rounded once; models it does not cover keep their own code."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwen2.model import PagedKVCache, Transformer
from qwen2.quant import fused_prefill
from qwen2.quant.blocks import Q8_0, bf16_gemm_is_fast, blocks_from_float, kernels_available, many_rows_on_tiles
from qwen2.quant.fused_prefill import FusedPrefill
from qwen2.quant.kernels import gguf_ops
from tests.conftest import tiny_config

pytestmark = pytest.mark.skipif(not kernels_available(), reason="the GGUF kernels cannot be built on this machine")
needs_bf16 = pytest.mark.skipif(not bf16_gemm_is_fast(), reason="this CPU has no bf16 GEMM hardware "
                                "(AMX or AVX512-BF16): many rows take the model's own float32 layers")
BLOCK, MAX_LEN = 16, 128


def build(**overrides) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=512, **overrides)).eval()
    blocks_from_float(model, Q8_0, activations="int8")
    model.prefill_step = FusedPrefill.for_model(model)
    return model


def prefill_then_decode(model: Transformer, prompts: list[list[int]], chunk: int, steps: int):
    """Right-padded prompts prefilled together in chunks of `chunk` positions (each chunk after the first
    reads the earlier ones from the paged cache), then `steps` greedy decode steps. -> chunk logits, tokens"""
    per_slot = MAX_LEN // BLOCK
    rows = len(prompts)
    cache = PagedKVCache(model.config, 1 + per_slot * rows, BLOCK, rows, MAX_LEN)
    cache.zero_blocks(list(range(cache.blocks)))
    for r in range(rows):
        cache.tables[r] = torch.arange(1 + r * per_slot, 1 + (r + 1) * per_slot)
    longest = max(map(len, prompts))
    ids = torch.tensor([p + [0] * (longest - len(p)) for p in prompts])
    logits = []
    with torch.no_grad():
        for start in range(0, longest, chunk):
            stop = min(start + chunk, longest)
            positions = torch.arange(start, stop).expand(rows, -1)
            logits.append(model(ids[:, start:stop], positions, cache=cache, slots=torch.arange(rows)))
        every = torch.cat(logits, dim=1)
        tokens = [[int(every[r, len(p) - 1].argmax())] for r, p in enumerate(prompts)]
        for _ in range(steps):
            positions = torch.tensor([[len(p) + len(t) - 1] for p, t in zip(prompts, tokens)])
            step = model(torch.tensor([[t[-1]] for t in tokens]), positions, cache=cache, slots=torch.arange(rows),
                         logits_index=torch.zeros(rows, dtype=torch.long))
            for r in range(rows):
                tokens[r].append(int(step[r].argmax()))
    return every, tokens


@needs_bf16
@pytest.mark.parametrize("prompts, chunk", [([list(range(3, 100))], 128), ([list(range(3, 100))], 48),
                                            ([list(range(7, 60)), [300] * 41, list(range(200, 270))], 128)],
                         ids=["one prompt in one pass", "one prompt in two chunks", "three padded prompts"])
def test_the_fused_prefill_equals_the_models_own_layers(prompts, chunk, isa):
    model = build()
    assert model.prefill_step is not None
    fused_logits, fused_tokens = prefill_then_decode(model, prompts, chunk, 16)
    model.prefill_step = None
    own_logits, own_tokens = prefill_then_decode(model, prompts, chunk, 16)
    # Both multiply in bf16; stacking q/k/v (and gate/up) into one GEMM may change the order oneDNN adds
    # a product's terms in, so a bf16 output can round to its neighbour: ~0.4% of a value.
    real = torch.cat([torch.arange(max(map(len, prompts)))[None] < len(p) for p in prompts])
    error = (fused_logits - own_logits)[real].abs().max() / own_logits[real].abs().max()
    assert error < 2e-2, error
    assert fused_tokens == own_tokens


class CountingOps:
    """The kernels, counting the calls of the tile attention."""

    def __init__(self, ops):
        self.ops, self.attention_calls = ops, 0

    def __getattr__(self, name: str):
        return getattr(self.ops, name)

    def attention_tiles(self, *args):
        self.attention_calls += 1
        return self.ops.attention_tiles(*args)


@needs_bf16
def test_with_amx_prompts_attend_on_tiles_and_get_the_models_own_tokens(isa, monkeypatch):
    """head_dim 64, as Qwen2-0.5B's: with AMX the fused prefill's attention runs on our tiles (three prompts of
    different lengths, the second chunk reading the first from the cache) and gives the tokens of the model's
    own float32 attention; elsewhere it is that attention."""
    model = build(hidden_size=256, intermediate_size=256)
    ops = CountingOps(fused_prefill.compiled_ops())
    monkeypatch.setattr(fused_prefill, "compiled_ops", lambda: ops)
    prompts = [list(range(7, 60)), [300] * 41, list(range(200, 270))]
    fused_logits, fused_tokens = prefill_then_decode(model, prompts, 48, 16)
    assert (ops.attention_calls > 0) == bool(ops.tiles())
    model.prefill_step = None
    own_logits, own_tokens = prefill_then_decode(model, prompts, 48, 16)
    real = torch.cat([torch.arange(max(map(len, prompts)))[None] < len(p) for p in prompts])
    error = (fused_logits - own_logits)[real].abs().max() / own_logits[real].abs().max()
    assert error < 2e-2, error
    assert fused_tokens == own_tokens


def test_models_it_does_not_cover_keep_their_own_layers():
    assert FusedPrefill.for_model(build(sliding_window=8, use_sliding_window=True, max_window_layers=0)) is None
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=512)).eval()
    blocks_from_float(model, Q8_0, activations="float32")  # the exact mode: float activations
    assert FusedPrefill.for_model(model) is None
    if bf16_gemm_is_fast():
        fused = build().prefill_step
        x = torch.zeros(1, 40, 64)
        assert fused.applies(x, None) and not fused.applies(x[:, :1], None) and not fused.applies(x[:, :15], None)
        # 16 rows: with AMX the products take bf16 tiles, here as in the own layers; elsewhere those take int8
        assert fused.applies(x[:, :16], None) == many_rows_on_tiles()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("width", [64, 13])
def test_silu_mul_equals_float32_rounded_once(width, dtype, isa):
    torch.manual_seed(0)
    gate_up = (torch.randn(37, 2 * width) * 4).to(dtype)
    gate, up = gate_up.float().chunk(2, dim=-1)
    want = (F.silu(gate) * up).bfloat16()
    got = gguf_ops(isa).silu_mul_bf16(gate_up)
    assert got.dtype == torch.bfloat16 and got.shape == (37, width)
    # exp's polynomial is within ~1e-7 of libm's: a result can round to the other bf16 neighbour
    assert ((got.float() - want.float()).abs() <= want.float().abs() * 2 ** -8 + 1e-30).all()
    assert (got == want).float().mean() > 0.99
