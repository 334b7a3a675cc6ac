"""The decode step in Triton kernels (qwen2.engine.triton_decode) against the model's own path
(rotary, the paged cache's write and gather, SDPA with a mask, the residual adds, RMSNorm, SiLU) on
the same weights and cache.

On a CUDA machine the kernels run compiled; elsewhere in Triton's interpreter on CPU tensors
(TRITON_INTERPRET=1, set by tests/conftest.py before Triton loads), whose products are float32 as
the model's are here. The GPU's speed is bench/gpu_check.py's business, never a test's.
"""
import pytest
import torch

pytest.importorskip("triton", reason="Triton is a dev dependency (pip install -e '.[dev]'); no wheel here")

from qwen2.config import Qwen2Config  # noqa: E402
from qwen2.engine.triton_decode import TritonDecode, add_rms_norm, silu_mul  # noqa: E402
from qwen2.model import PagedKVCache, RMSNorm, Transformer  # noqa: E402
from tests.gpu_compile import cubin_sizes  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK = 16
GQA7 = dict(vocab_size=256, hidden_size=224, intermediate_size=64, num_hidden_layers=2, num_attention_heads=14,
            num_key_value_heads=2, tie_word_embeddings=False)  # Qwen2-7B's 7 query heads a KV head, head_dim 16
WIDE = dict(GQA7, hidden_size=256, num_attention_heads=4, num_key_value_heads=4)  # no GQA, head_dim 64
WINDOWED = dict(GQA7, use_sliding_window=True, sliding_window=24, max_window_layers=1)  # layer 1 slides
MOE = dict(GQA7, model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
           shared_expert_intermediate_size=64)


def prefilled(config: Qwen2Config, lengths: list[int]) -> tuple[Transformer, PagedKVCache, torch.Tensor]:
    """A float32 model and a paged cache holding one prompt per slot (blocks handed out shuffled, as
    a running engine leaves them), written by the model's own prompt path; and the prompts' tokens."""
    torch.manual_seed(0)
    model = Transformer(config).to(DEVICE).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 1.0)
    cache = PagedKVCache(config, 64, BLOCK, len(lengths), 256, device=DEVICE)
    cache.k.zero_(), cache.v.zero_()  # the pools are compared whole: no uninitialised (maybe NaN) block
    free = (torch.randperm(63) + 1).tolist()  # block 0 is the padding rows'
    tokens = torch.randint(0, 256, (len(lengths), max(lengths) + 1))
    for slot, length in enumerate(lengths):
        for i in range(-(-(length + 1) // BLOCK)):
            cache.tables[slot, i] = free.pop()
        with torch.no_grad():
            model(tokens[slot : slot + 1, :length].to(DEVICE), cache=cache, slots=torch.tensor([slot], device=DEVICE))
    return model, cache, tokens


def decode_step(model: Transformer, cache: PagedKVCache, tokens: torch.Tensor, lengths: list[int], slots: list[int],
                kv_len: int) -> torch.Tensor:
    """One token per row at position `lengths[slot]` (a fixed-shape step: every row reads `kv_len` keys)."""
    rows = torch.tensor(slots)
    step = tokens[rows.clamp(min=0), torch.tensor(lengths)[rows.clamp(min=0)]][:, None]
    positions = torch.tensor([lengths[s] if s >= 0 else 0 for s in slots])[:, None]
    with torch.no_grad():
        return model(step.to(DEVICE), positions.to(DEVICE), cache=cache, slots=rows.to(DEVICE), kv_len=kv_len)


def both_ways(config: dict, lengths: list[int], slots: list[int], kv_len: int, stacked: bool = False):
    model, cache, tokens = prefilled(Qwen2Config(**config), lengths)
    if stacked:  # q/k/v and gate/up as one product each: the step's SiLU kernel takes gate/up's
        model.fuse_weights()
    theirs = PagedKVCache(model.config, 64, BLOCK, len(lengths), 256, device=DEVICE)
    theirs.k.copy_(cache.k), theirs.v.copy_(cache.v), theirs.tables.copy_(cache.tables)
    want = decode_step(model, theirs, tokens, lengths, slots, kv_len)
    model.decode_step = TritonDecode(model)
    got = decode_step(model, cache, tokens, lengths, slots, kv_len)
    return got, want, cache, theirs


@pytest.mark.parametrize("config, stacked", [(GQA7, False), (GQA7, True), (WIDE, True), (WINDOWED, True),
                                             (MOE, True)],
                         ids=["gqa7", "gqa7-stacked", "wide-heads", "sliding-window", "moe"])
def test_a_decode_step_has_the_logits_and_writes_the_cache_of_the_models_own_path(config, stacked):
    lengths = [5, 40, 77]  # within a block, across blocks, past the first span of 64 keys
    got, want, cache, theirs = both_ways(config, lengths, [0, 1, 2], kv_len=96, stacked=stacked)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # each row's new key (rotated) and value in place; the second layer's differ by the first's rounding
    torch.testing.assert_close(cache.k, theirs.k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.v, theirs.v, rtol=1e-5, atol=1e-5)
    assert torch.equal(cache.v[0], theirs.v[0])  # the first layer's values: copied, not computed


def int4_layer(linear: torch.nn.Linear) -> torch.nn.Module:
    from qwen2.quant.int_linear import quantize_int4
    from qwen2.quant.triton_int4 import TritonInt4Linear

    q, scale, zero = quantize_int4(linear.weight.detach(), 32)
    return TritonInt4Linear(q, scale, zero, 32, linear.bias)


def q8_0_layer(linear: torch.nn.Linear) -> torch.nn.Module:  # as a GGUF holds them
    from qwen2.quant.blocks import encode_q8_0
    from qwen2.quant.triton_blocks import TritonBlockLinear

    return TritonBlockLinear(encode_q8_0(linear.weight.detach().cpu()).to(DEVICE), 8, linear.in_features, linear.bias)


# int4 layers run their products on bf16 activations, so the attention's float32 sums, which differ in
# order, can move an activation across a bf16 rounding; block layers keep float32 activations
@pytest.mark.parametrize("make, tolerance", [(int4_layer, 1e-2), (q8_0_layer, 1e-5)], ids=["int4", "q8_0-blocks"])
def test_quantized_layers_on_our_kernels_run_stacked_with_the_logits_of_the_models_own_path(make, tolerance):
    lengths = [5, 40]
    model, cache, tokens = prefilled(Qwen2Config(**GQA7), lengths)
    for block in model.model.layers:  # every projection quantized from its own weights
        for parent, names in ((block.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                              (block.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                setattr(parent, name, make(getattr(parent, name)))
    theirs = PagedKVCache(model.config, 64, BLOCK, len(lengths), 256, device=DEVICE)
    theirs.k.copy_(cache.k), theirs.v.copy_(cache.v), theirs.tables.copy_(cache.tables)
    want = decode_step(model, theirs, tokens, lengths, [0, 1], 64)
    step = TritonDecode(model)
    assert all(qkv is not None and qkv.out_features == 224 + 2 * 32 for qkv in step.qkv)  # one product each
    assert all(gate_up is not None and gate_up.out_features == 2 * 64 for gate_up in step.gate_up)
    model.decode_step = step
    got = decode_step(model, cache, tokens, lengths, [0, 1], 64)
    assert float((got - want).norm() / want.norm()) < tolerance


def test_padding_rows_and_spans_past_every_row_change_no_real_rows_answer():
    lengths = [3, 33]
    got, want, _, _ = both_ways(GQA7, lengths, [1, -1, 0, -1], kv_len=256)  # 4 spans, most rows need 1
    torch.testing.assert_close(got[[0, 2]], want[[0, 2]], rtol=1e-4, atol=1e-4)
    assert torch.isfinite(got).all()


def test_it_steps_in_only_for_one_token_per_row_over_a_paged_cache():
    model, cache, _ = prefilled(Qwen2Config(**GQA7), [4])
    step = TritonDecode(model)
    one, many = torch.zeros(2, 1, 224), torch.zeros(2, 5, 224)
    assert step.applies(one, cache) and not step.applies(many, cache)
    assert not step.applies(one, None)
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        TritonDecode(Transformer(Qwen2Config(**dict(GQA7, hidden_size=168, num_attention_heads=14))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_norm_and_silu_compute_what_the_model_does(dtype):
    torch.manual_seed(0)
    norm = RMSNorm(200, 1e-6).to(DEVICE, dtype)
    with torch.no_grad():
        norm.weight.normal_(1, 0.1)
    x, r = (torch.randn(3, 1, 200, device=DEVICE, dtype=dtype) for _ in range(2))
    total, normed = add_rms_norm(x, r, norm)
    gate_up = torch.randn(3, 1, 2 * 1500, device=DEVICE, dtype=dtype)  # two blocks of 1024, the second partial
    gate, up = gate_up.chunk(2, dim=-1)
    with torch.no_grad():
        want = [x + r, norm(x + r), torch.nn.functional.silu(gate) * up]
    got = [total, normed, silu_mul(gate_up)]
    # float32: the same sums in another order. bf16: a rounding apart on the GPU; the interpreter's
    # casts truncate where torch rounds, and the norm's output passes three of them
    step = 2 ** -7 if DEVICE == "cuda" else 2 ** -5
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=step, atol=step)
    for g, w in zip(got, want):
        assert g.dtype == dtype and g.shape == w.shape
        torch.testing.assert_close(g.float(), w.float(), **tolerance)


def test_the_engine_decodes_the_same_greedy_tokens_with_it(default_tokenizer):
    from qwen2.engine.engine import Engine
    from qwen2.engine.sampling import SamplingParams

    def greedy(model: Transformer) -> list[list[int]]:
        engine = Engine(model, default_tokenizer, max_concurrency=3, max_seq_len=160, prefill_chunk=64,
                        static_decode=False)
        generator = torch.Generator().manual_seed(1)
        requests = [engine.submit(torch.randint(0, 256, (n,), generator=generator).tolist(),
                                  SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)) for n in (7, 20, 30)]
        while engine.has_work:
            engine.step()
        return [r.output for r in requests]

    model, _, _ = prefilled(Qwen2Config(**GQA7), [1])
    with torch.inference_mode():
        want = greedy(model)
        model.decode_step = TritonDecode(model)
        got = greedy(model)
    assert got == want and len({t for row in want for t in row}) > 3  # tokens that vary, not one repeated


COMPILE = """
from qwen2.engine import triton_decode as a

meta = dict(N_HEADS=28, N_KV=4, HEAD_DIM=128)  # Qwen2-7B's, in bf16
cases = {
    "rotate": (a._rotate_and_write, ["*bf16", "i32", "*bf16", "i32", "*bf16", "i32", "*bf16", "*bf16", "*bf16",
                                      "*bf16", "*bf16", "*i64"], meta),
    "attend": (a._attend_split, ["*bf16", "*bf16", "*bf16", "*i64", "*i64", "*fp32", "*fp32", "*fp32", "fp32", "i32",
                                  "i32", "i32"], dict(meta, GROUP=16, BLOCK=16, SPAN=64, DOT=tl.bfloat16)),
    "merge": (a._merge_splits, ["*fp32", "*fp32", "*fp32", "*bf16", "i32"], dict(meta, GROUP=16)),
    "norm": (a._add_rms_norm, ["*bf16", "*bf16", "*bf16", "*bf16", "*bf16", "i32", "fp32"], dict(BLOCK=4096)),
    "silu": (a._silu_mul, ["*bf16", "*bf16", "i32"], dict(BLOCK=1024)),
}
for name, (kernel, types, constants) in cases.items():
    for arch in (80, 90):  # A100, H100/H200
        sizes[f"{name} sm_{arch}"] = cubin_bytes(kernel, types, constants, 4, arch)
"""


def test_the_kernels_compile_to_machine_code_for_the_gpus_we_measure_on():
    sizes = cubin_sizes(COMPILE)
    assert len(sizes) == 10 and all(size > 1000 for size in sizes.values()), sizes
