"""GPTQ-Int4 and AWQ checkpoints, built here from random integers by packers written from the formats'
documentation (AutoGPTQ / AutoAWQ layouts), since no such checkpoint is reachable offline.

The packers start from integers q, z and float16 scales s; every check compares against the float64
value (q - z) * s of those integers, never against our own unpacker.
Tolerances: the int4 kernel keeps scale = s and zero = (8 - z) * s in bf16, so each weight may move by
2^-8 * (|q - 8| + |8 - z|) * s <= s / 16; float dequantization is exact up to float32 rounding.
"""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from qwen2.errors import WeightsError
from qwen2.loading import load, load_model
from qwen2.model import Transformer
from qwen2.quant.cuda_int4 import CudaInt4Linear
from qwen2.quant.int_linear import Int4Linear, Int8Linear
from qwen2.quant.prequantized import to_int4_linear
from qwen2.weights.export import export_hf
from qwen2.weights.gptq_awq import dequantize, int4_format, unpack_awq, unpack_gptq
from tests.conftest import tiny_config
from tests.test_cli import assert_one_line_error, qwen2

AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ: nibble i of a word holds column 8c + AWQ_PACK_ORDER[i]


def as_int32(words: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(words.astype(np.uint32).view(np.int32).copy())


def pack_columns(ints: np.ndarray, order=range(8)) -> torch.Tensor:
    """[R, 8C] ints 0..15 -> int32 [R, C]; nibble i (bits 4i..4i+3) of word c holds column 8c + order[i]."""
    rows, cols = ints.shape
    words = np.zeros((rows, cols // 8), dtype=np.uint64)
    for i, column in enumerate(order):
        words |= ints[:, column::8].astype(np.uint64) << np.uint64(4 * i)
    return as_int32(words)


def random_layer(n: int, k: int, group_size: int, sym: bool, desc_act: bool, seed: int):
    """Random integers of one Linear: q [N, K], z [G, N], s float16 [G, N], g_idx [K]."""
    rng = np.random.default_rng(seed)
    size = k if group_size == -1 else group_size
    groups = k // size
    q = rng.integers(0, 16, (n, k))
    z = np.full((groups, n), 8) if sym else rng.integers(1, 16, (groups, n))  # GPTQ v1 can't store 0
    s = torch.from_numpy(rng.uniform(0.002, 0.02, (groups, n))).half()
    g_idx = np.arange(k) // size
    if desc_act:  # quantized in a shuffled input order: the j-th input visited falls in group j // size
        g_idx = np.empty(k, dtype=np.int64)
        g_idx[rng.permutation(k)] = np.arange(k) // size
    return q, z, s, g_idx


def pack_gptq(q, z, s, g_idx, v1=True) -> dict[str, torch.Tensor]:
    """AutoGPTQ: qweight [K/8, N] packed along the inputs, qzeros [G, N/8] along the outputs (v1: z - 1)."""
    stored = (z - 1) & 0xF if v1 else z
    return {"qweight": pack_columns(q).T.contiguous(), "qzeros": pack_columns(stored), "scales": s,
            "g_idx": torch.from_numpy(g_idx).int()}


def pack_awq(q, z, s) -> dict[str, torch.Tensor]:
    """AutoAWQ GEMM: qweight [K, N/8] and qzeros [G, N/8], both packed along the outputs, interleaved."""
    return {"qweight": pack_columns(q.T, AWQ_PACK_ORDER), "qzeros": pack_columns(z, AWQ_PACK_ORDER), "scales": s}


def float64_weight(q, z, s, g_idx) -> torch.Tensor:
    """The reference: W [N, K] = (q - z[g_idx]) * s[g_idx], in float64."""
    return torch.from_numpy((q - z[g_idx].T) * s.double().numpy()[g_idx].T)


def bf16_bound(q, z, s, g_idx) -> torch.Tensor:
    """Per-weight bound of the int4 kernel's bf16 scale/zero rounding: 2^-8 (|q - 8| + |8 - z|) s."""
    return torch.from_numpy((np.abs(q - 8) + np.abs(8 - z[g_idx].T)) * s.double().numpy()[g_idx].T / 256)


CASES = {  # name: (format, group_size, sym, desc_act)
    "gptq-sym": ("gptq", 128, True, False),
    "gptq-asym": ("gptq", 128, False, False),
    "gptq-sym-desc_act": ("gptq", 128, True, True),
    "gptq-asym-desc_act": ("gptq", 64, False, True),
    "gptq-per-channel": ("gptq", -1, False, False),
    "awq": ("awq", 128, False, False),
}


def unpacked(case: str, n: int = 256, k: int = 512, seed: int = 0):
    method, group_size, sym, desc_act = CASES[case]
    q, z, s, g_idx = random_layer(n, k, group_size, sym, desc_act, seed)
    if method == "gptq":
        t = pack_gptq(q, z, s, g_idx)
        layer = unpack_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], zero_offset=1)
    else:
        z = np.random.default_rng(seed + 1).integers(0, 16, z.shape)  # AWQ stores z itself: 0 included
        t = pack_awq(q, z, s)
        layer = unpack_awq(t["qweight"], t["qzeros"], t["scales"], group_size)
    return (q, z, s, g_idx), layer, group_size


@pytest.mark.parametrize("case", CASES)
def test_unpacking_returns_the_packers_integers(case):
    (q, z, s, g_idx), layer, _ = unpacked(case)
    assert torch.equal(layer.q, torch.from_numpy(q).to(torch.uint8))
    assert torch.equal(layer.zeros, torch.from_numpy(z).int())
    assert torch.equal(layer.g_idx, torch.from_numpy(g_idx).long())
    assert torch.equal(layer.scales, s.float())


def test_gptq_v1_zeros_are_stored_minus_one_so_zero_reads_back_as_sixteen():
    q, z, s, g_idx = random_layer(16, 64, 32, sym=False, desc_act=False, seed=3)
    z[0, 0] = 0  # v1 writes (0 - 1) & 0xF = 15, which every v1 loader reads as 16
    t = pack_gptq(q, z, s, g_idx)
    assert t["qzeros"][0, 0].item() & 0xF == 15
    assert unpack_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], zero_offset=1).zeros[0, 0] == 16
    v2 = pack_gptq(q, z, s, g_idx, v1=False)
    assert unpack_gptq(v2["qweight"], v2["qzeros"], v2["scales"], v2["g_idx"], zero_offset=0).zeros[0, 0] == 0


def test_sym_gptq_stores_the_zero_words_as_0x77777777():
    q, z, s, g_idx = random_layer(16, 64, 32, sym=True, desc_act=False, seed=4)
    assert (pack_gptq(q, z, s, g_idx)["qzeros"] == 0x77777777).all()


@pytest.mark.parametrize("case", CASES)
def test_float_dequantization_equals_the_float64_weights(case):
    ints, layer, _ = unpacked(case)
    torch.testing.assert_close(dequantize(layer, torch.float64), float64_weight(*ints), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("case", CASES)
def test_int4_layer_weights_are_within_the_bf16_bound_of_the_float64_weights(case):
    ints, layer, group_size = unpacked(case)
    int4 = to_int4_linear(layer, group_size, bias=None)
    assert isinstance(int4, Int4Linear)
    assert (int4.input_perm is not None) == CASES[case][3]  # only desc_act reorders the inputs
    w_stored = int4.dequantize(torch.float64)
    if int4.input_perm is None:
        w = w_stored
    else:
        w = torch.empty_like(w_stored)
        w[:, int4.input_perm] = w_stored  # stored column j is input input_perm[j]
    error = (w - float64_weight(*ints)).abs()
    assert (error <= bf16_bound(*ints) * (1 + 1e-6)).all(), float(error.max())
    for rows in (3, 100):  # the int4 kernel, and above INT4_KERNEL_MAX_ROWS the dequantizing path
        x = torch.randn(rows, int4.in_features)
        y_ref = x.double() @ float64_weight(*ints).T
        # bf16 activations: |dy| <= 2^-8 (|x| @ |W| + |x| @ bound), plus float32 accumulation
        slack = (x.abs().double() @ (float64_weight(*ints).abs() + bf16_bound(*ints)).T) * 2 ** -8 * 2 + 1e-4
        assert ((int4(x).double() - y_ref).abs() <= slack).all()


def test_a_group_larger_than_the_kernels_repeats_its_scale_exactly():
    ints, layer, _ = unpacked("gptq-per-channel", n=32, k=512)
    assert to_int4_linear(layer, -1, None).group_size == 256
    ints, layer, _ = unpacked("gptq-per-channel", n=40, k=512)  # out % 16: the kernel can't take it
    assert to_int4_linear(layer, -1, None) is None


# -- whole checkpoints -----------------------------------------------------------------------------------

MODEL_CASES = {  # name: (quantization_config, desc_act)
    "gptq-desc_act": ({"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "sym": False,
                       "damp_percent": 0.01, "static_groups": False, "true_sequential": True}, True),
    "gptq-sym": ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}, False),
    "awq": ({"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm"}, False),
}


def write_checkpoint(folder, quantization, desc_act, tokenizer, seed=0):
    """A tiny Qwen2 as an official-layout folder; returns the float64 reference weights per Linear."""
    config = tiny_config(hidden_size=128, intermediate_size=256, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 1.0)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    export_hf(config, model.state_dict(), tokenizer, folder)
    tensors, reference = {}, {}
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    for i, name in enumerate(linears):
        linear = model.get_submodule(name)
        n, k = linear.out_features, linear.in_features
        group_size = quantization["group_size"]
        if quantization["quant_method"] == "gptq":
            q, z, s, g_idx = random_layer(n, k, group_size, quantization["sym"], desc_act, seed + i)
            packed = pack_gptq(q, z, s, g_idx)
        else:
            q, z, s, g_idx = random_layer(n, k, group_size, False, False, seed + i)
            packed = pack_awq(q, z, s)
        tensors |= {f"{name}.{key}": t for key, t in packed.items()}
        if linear.bias is not None:
            tensors[f"{name}.bias"] = linear.bias.detach().half()
        reference[f"{name}.weight"] = float64_weight(q, z, s, g_idx)
    for key, t in model.state_dict().items():
        if not key.endswith(".weight") or key.removesuffix(".weight") not in linears:
            if not (key.endswith(".bias") and key.removesuffix(".bias") in linears):
                tensors[key] = t.detach().half()  # norms, embeddings, lm_head: float16 as shipped
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    hf = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(hf | {"quantization_config": quantization, "torch_dtype":
                                                         "float16"}))
    float_state = {k: (reference[k] if k in reference else tensors[k]).float() for k in model.state_dict()}
    return config, float_state


@pytest.fixture(scope="module")
def checkpoints(default_tokenizer, tmp_path_factory) -> dict:
    """name -> (folder, the float32 model of its float64 reference weights)."""
    built = {}
    for name, (quantization, desc_act) in MODEL_CASES.items():
        folder = tmp_path_factory.mktemp(name)
        config, float_state = write_checkpoint(folder, quantization, desc_act, default_tokenizer)
        built[name] = folder, Transformer.from_state_dict(config, float_state, dtype=torch.float32)
    return built


TOKENS = torch.tensor([[9707, 11, 1879, 0, 576, 6722, 315, 9625, 374]])


@pytest.mark.parametrize("name", MODEL_CASES)
def test_a_checkpoint_runs_on_its_own_int4_weights_with_the_float_models_logits(checkpoints, name):
    folder, reference = checkpoints[name]
    net, _ = load_model(folder, dtype="float32")  # quant auto: the checkpoint's own int4
    int4 = [m for m in net.modules() if isinstance(m, Int4Linear)]
    assert len(int4) == 14  # 7 Linears in each of 2 layers; lm_head stays float as shipped
    with torch.no_grad():
        got, want = net(TOKENS), reference(TOKENS)
    # bf16 scale/zero (<= s/16 per weight) and bf16 activations inside the int4 layers: measured <= 0.5%
    assert (got - want).abs().max() <= 0.02 * want.abs().max()
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("name", MODEL_CASES)
def test_quant_none_dequantizes_to_the_float64_weights(checkpoints, name):
    folder, reference = checkpoints[name]
    net, _ = load_model(folder, dtype="float32", quant="none")
    assert not any(isinstance(m, Int4Linear) for m in net.modules())
    with torch.no_grad():
        torch.testing.assert_close(net(TOKENS), reference(TOKENS), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", MODEL_CASES)
def test_generate_runs_on_the_checkpoint(checkpoints, name):
    llm = load(checkpoints[name][0], max_concurrency=1, ctx=64)
    out = llm.generate("def quicksort(arr):", max_tokens=6, temperature=0)
    assert len(out.tokens) == 6 and out.finish_reason == "length"


def test_quant_int8_dequantizes_then_requantizes(checkpoints):
    net, _ = load_model(checkpoints["gptq-desc_act"][0], quant="int8")
    assert any(isinstance(m, Int8Linear) for m in net.modules())
    assert not any(isinstance(m, Int4Linear) for m in net.modules())


def test_the_command_line_generates_from_the_folder(checkpoints):
    result = qwen2("generate", "--model", str(checkpoints["gptq-sym"][0]), "-p", "def fib(n):", "-n", "4",
                   "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr


# -- bad input -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("quantization, phrase", [
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "bits=3"),
    ({"quant_method": "awq", "bits": 8, "group_size": 128, "version": "gemm", "zero_point": True}, "bits=8"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv", "zero_point": True}, "'gemv'"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 0}, "group_size=0"),
    ({"quant_method": "bitsandbytes", "bits": 4}, "only GPTQ and AWQ"),
])
def test_unsupported_quantization_configs_are_refused_by_name(quantization, phrase):
    with pytest.raises(WeightsError, match=phrase):
        int4_format(quantization)


def broken_copy(folder, tmp_path, change):
    from safetensors.torch import load_file

    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    for f in folder.iterdir():
        if f.name != "model.safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    save_file(tensors, tmp_path / "model.safetensors")
    return tmp_path


@pytest.mark.parametrize("change, phrase", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.qzeros"), "lacks model.layers.1.mlp.up_proj.qzeros"),
    (lambda t: t.update({"model.layers.0.self_attn.o_proj.scales": torch.zeros(3, 128).half()}),
     r"model.layers.0.self_attn.o_proj.scales is torch.float16 \(3, 128\), expected"),
    (lambda t: t.update({"model.layers.0.mlp.down_proj.qweight": torch.zeros(32, 16, dtype=torch.int32)}),
     r"model.layers.0.mlp.down_proj.qweight (is torch.int32 )?\(32, 16\)"),
])
def test_broken_tensors_are_one_error_naming_the_tensor(checkpoints, tmp_path, change, phrase):
    folder = broken_copy(checkpoints["gptq-desc_act"][0], tmp_path, change)
    for quant in ("auto", "none"):
        with pytest.raises(WeightsError, match=phrase):
            load_model(folder, quant=quant)


def test_an_unsupported_checkpoint_is_one_line_on_the_command_line(checkpoints, tmp_path):
    folder = broken_copy(checkpoints["awq"][0], tmp_path, lambda t: None)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["bits"] = 8
    (folder / "config.json").write_text(json.dumps(config))
    assert_one_line_error(qwen2("generate", "--model", str(folder), "-p", "hi"), "bits=8", "only 4-bit AWQ")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA int4 kernel needs a CUDA device")
@pytest.mark.parametrize("name", MODEL_CASES)
def test_a_checkpoint_loads_on_cuda_on_its_own_integers_with_no_float_copy(checkpoints, name):
    folder, reference = checkpoints[name]
    net, _ = load_model(folder, dtype="bfloat16", device="cuda")
    int4 = [m for m in net.modules() if isinstance(m, CudaInt4Linear)]
    assert len(int4) == 14
    # packed int32 tiles (4-d), bf16 scales and zeros (3-d): no float matrix anywhere
    assert not any(t.is_floating_point() and t.dim() == 2 for m in int4 for t in m.buffers())
    with torch.no_grad():
        got, want = net(TOKENS.cuda()).float().cpu(), reference(TOKENS)
    assert (got - want).abs().max() <= 0.05 * want.abs().max()  # bf16 activations throughout
