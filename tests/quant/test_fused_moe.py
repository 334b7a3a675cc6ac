"""The MoE experts call: one compiled call for a layer's routed int8 experts gives to the bit what
the per-expert loop gives (every vector ISA this CPU runs, several block types, 1 to 32 rows, any
routing), a tiny MoE model's logits with it equal those without, the loader gives it to int8
experts, and layers it does not cover keep the loop."""

from __future__ import annotations

import pytest
import torch

from qwen2.model import KVCache, MoE, Transformer
from qwen2.quant import blocks, fused_moe
from qwen2.quant.blocks import INT8_KERNEL_MAX_ROWS, Q4_K, Q8_0, BlockLinear, blocks_from_float, make_blocks
from qwen2.quant.fused_moe import FusedExperts, fusable, fuse_experts
from qwen2.quant.kernels import gguf_ops
from tests.conftest import tiny_config

pytestmark = pytest.mark.skipif(not blocks.kernels_available(), reason="the GGUF kernels cannot be built here")
Q5_0 = 6
MOE = dict(model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
           shared_expert_intermediate_size=64)


def int8_layer(qtypes: tuple[int, int, int], hidden: int = 256, width: int = 256, experts: int = 8,
               k: int = 3) -> MoE:
    """An MoE layer whose experts' gate, up and down are int8 block layers of `qtypes`."""
    torch.manual_seed(0)
    config = tiny_config(hidden_size=hidden, **(MOE | dict(num_experts=experts, num_experts_per_tok=k,
                                                         moe_intermediate_size=width)))
    moe = MoE(config).eval()
    for mlp in moe.experts.values():
        for name, qtype in zip(fused_moe.PROJECTIONS, qtypes):
            w = getattr(mlp, name).weight
            b = make_blocks(w, qtype)
            assert b.qtype == qtype
            setattr(mlp, name, BlockLinear(b.data, qtype, w.shape[1], activations="int8"))
    assert fusable(moe)
    return moe


def routing(moe: MoE, x: torch.Tensor, favourite: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's top-k as MoE.forward takes it; `favourite`: an expert every row chooses."""
    probs = torch.softmax(moe.gate(x), dim=-1, dtype=torch.float32)
    if favourite is not None:
        probs[:, favourite] += 1
    weights, chosen = torch.topk(probs, moe.top_k, dim=-1)
    return weights / weights.sum(-1, keepdim=True), chosen


def loop(moe: MoE, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor, isa: str,
         monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    """The per-expert loop's result. The AMX build gives 16 or more rows of one expert to bf16 tiles,
    another rounding than the int8 products the call runs: there the loop runs on the same CPU's VNNI
    build."""
    if isa == "amx":
        vnni = gguf_ops("avx512vnni")
        monkeypatch.setattr(blocks, "compiled_ops", lambda: vnni)
    return moe._routed(x, chosen, weights)


@pytest.mark.parametrize("qtypes", [(Q8_0,) * 3, (Q5_0,) * 3, (Q4_K,) * 3, (Q4_K, Q5_0, Q8_0)],
                         ids=["Q8_0", "Q5_0", "Q4_K", "mixed"])
@pytest.mark.parametrize("rows", [1, 5, INT8_KERNEL_MAX_ROWS])
def test_the_call_equals_the_per_expert_loop(isa, qtypes, rows, monkeypatch):
    moe = int8_layer(qtypes)
    x = torch.randn(rows, moe.gate.in_features)
    with torch.no_grad():
        weights, chosen = routing(moe, x)
        got = FusedExperts(moe)(x, chosen, weights)
        # to the bit: the same int8 roundings and integer sums, torch's SiLU, the slots summed by torch
        assert torch.equal(got, loop(moe, x, chosen, weights, isa, monkeypatch))


@pytest.mark.parametrize("case", ["ties", "one expert for every row", "most experts unused"])
def test_any_routing(isa, case, monkeypatch):
    moe = int8_layer((Q5_0, Q4_K, Q5_0), experts=16, k=4)
    x = torch.randn(INT8_KERNEL_MAX_ROWS - 3, moe.gate.in_features)
    with torch.no_grad():
        if case == "ties":  # equal logits: top-k breaks the ties, every slot weighs the same
            moe.gate.weight.zero_()
        weights, chosen = routing(moe, x, 7 if case == "one expert for every row" else None)
        if case == "most experts unused":
            chosen = torch.tensor([[2, 9, 5, 0]]).expand(x.shape[0], -1).contiguous()
        got = FusedExperts(moe)(x, chosen, weights)
        assert torch.equal(got, loop(moe, x, chosen, weights, isa, monkeypatch))


def build() -> Transformer:
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=512, **MOE)).eval()
    blocks_from_float(model, Q8_0, activations="int8")
    fuse_experts(model)
    return model


def decode(model: Transformer, prompts: list[list[int]], steps: int) -> list[torch.Tensor]:
    """The prompts prefilled together, then `steps` greedy decode steps of every row: each step's logits."""
    cache = KVCache(model.config, len(prompts), 64)
    n = len(prompts[0])
    tokens = torch.tensor(prompts)
    out = []
    with torch.no_grad():
        for step in range(steps + 1):
            positions = torch.arange(n)[None].expand(len(prompts), -1) if step == 0 else torch.full(
                (len(prompts), 1), n + step - 1)
            logits = model(tokens, positions, cache=cache)[:, -1]
            out.append(logits)
            tokens = logits.argmax(-1, keepdim=True)
    return out


@pytest.mark.parametrize("prompts", [[[5, 9, 11, 200, 3]], [[5, 9, 11], [40, 41, 42], [300, 1, 300]]],
                         ids=["one row", "three rows"])
def test_a_models_logits_with_the_call_equal_those_without(prompts, isa):
    model = build()
    assert all(block.mlp.fused_experts is not None for block in model.model.layers)
    fused = decode(model, prompts, 16)
    for block in model.model.layers:
        block.mlp.fused_experts = None
    own = decode(model, prompts, 16)
    assert all(torch.equal(got, want) for got, want in zip(fused, own))  # at most 9 rows an expert: no AMX


def test_the_call_runs_for_a_few_rows_only(monkeypatch):
    model = build()
    calls = []
    monkeypatch.setattr(FusedExperts, "__call__", lambda self, x, chosen, weights: calls.append(x.shape[0]) or
                        torch.zeros_like(x))
    with torch.no_grad():
        model(torch.arange(INT8_KERNEL_MAX_ROWS)[None])
        assert calls == [INT8_KERNEL_MAX_ROWS] * 2
        model(torch.arange(INT8_KERNEL_MAX_ROWS + 1)[None])  # a longer prefill takes the loop
    assert len(calls) == 2


def test_layers_it_does_not_cover_keep_the_loop():
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=512, **MOE)).eval()
    assert fuse_experts(model) == 0  # float experts (grouped GEMMs instead)
    model = Transformer(tiny_config(vocab_size=512, **MOE)).eval()
    blocks_from_float(model, Q8_0, activations="float32")
    assert fuse_experts(model) == 0
    moe = build().model.layers[0].mlp
    del moe.experts["3"]  # a tensor-parallel shard holds a subset
    assert not fusable(moe)


def test_the_loader_gives_int8_experts_the_call(default_tokenizer, tmp_path):
    from qwen2.loading import load_model
    from qwen2.weights.export import export_hf

    torch.manual_seed(0)
    model = Transformer(tiny_config(**MOE)).eval()
    export_hf(model.config, model.state_dict(), default_tokenizer, tmp_path)
    for quant, fused in (("q8_0", True), ("none", False)):
        net = load_model(tmp_path, quant=quant, dtype="float32", device="cpu")[0]
        assert all((block.mlp.fused_experts is not None) == fused for block in net.model.layers), quant
