"""GGUF reading: dequantization against gguf-py's reference, name mapping, config, errors,
and the default model's tensors against what transformers dequantizes."""

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from qwen2.errors import Qwen2Error, WeightsError
from qwen2.weights import gguf as qgguf
from qwen2.weights.gguf import dequantize, load_gguf, read_metadata
from qwen2.weights.hf import state_dict_keys

H, FFN, HEADS, KV, VOCAB = 64, 128, 4, 2, 96


def reference(raw: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(raw.reshape(*shape[:-1], -1), qtype)))


def random_blocks(qtype: Q, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant blocks (gguf-py cannot quantize these) with finite f16 scales."""
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    scales = rng.uniform(-0.1, 0.1, (n_blocks, 2)).astype(np.float16).view(np.uint8)
    d_at = {Q.Q6_K: [208], Q.Q3_K: [108], Q.Q2_K: [80, 82]}.get(qtype, [0, 2])  # where d (and dmin) sit
    for i, at in enumerate(d_at):
        blocks[:, at : at + 2] = scales[:, 2 * i : 2 * i + 2]
    return blocks


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0])
def test_dequantize_matches_gguf_reference(qtype, monkeypatch):
    monkeypatch.setattr(qgguf, "_CHUNK_WEIGHTS", 5 * 32)  # cross chunk boundaries
    shape = (7, 96)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    raw = gguf.quants.quantize(x, qtype).view(np.uint8).reshape(-1)
    ours = dequantize(raw, qtype, shape)
    assert ours.shape == shape and ours.dtype == torch.float32
    assert torch.equal(ours, reference(raw, qtype, shape))
    assert torch.equal(dequantize(raw, qtype, shape, torch.bfloat16), reference(raw, qtype, shape).bfloat16())


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_k_quants_match_gguf_reference(qtype, monkeypatch):
    monkeypatch.setattr(qgguf, "_CHUNK_WEIGHTS", 3 * 256)
    shape = (4, 512)
    raw = random_blocks(qtype, 8, np.random.default_rng(1)).reshape(-1)
    assert torch.equal(dequantize(raw, qtype, shape), reference(raw, qtype, shape))


# -- tiny GGUF files ---------------------------------------------------------------------
def gguf_names(n_layers: int, tied: bool) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> torch shape for a tiny dense qwen2."""
    shapes = {"token_embd.weight": (VOCAB, H), "output_norm.weight": (H,)}
    if not tied:
        shapes["output.weight"] = (VOCAB, H)
    hd = H // HEADS
    for i in range(n_layers):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (H,), f"blk.{i}.ffn_norm.weight": (H,),
            f"blk.{i}.attn_q.weight": (H, H), f"blk.{i}.attn_q.bias": (H,),
            f"blk.{i}.attn_k.weight": (KV * hd, H), f"blk.{i}.attn_k.bias": (KV * hd,),
            f"blk.{i}.attn_v.weight": (KV * hd, H), f"blk.{i}.attn_v.bias": (KV * hd,),
            f"blk.{i}.attn_output.weight": (H, H),
            f"blk.{i}.ffn_gate.weight": (FFN, H), f"blk.{i}.ffn_up.weight": (FFN, H),
            f"blk.{i}.ffn_down.weight": (H, FFN),
        }
    return shapes


def write_gguf(path: Path, tensors: dict[str, np.ndarray | tuple[np.ndarray, Q]], arch: str = "qwen2",
               n_layers: int = 2, extra: dict | None = None) -> Path:
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(n_layers)
    w.add_context_length(256)
    w.add_embedding_length(H)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_token_list([f"t{i}" for i in range(VOCAB)])
    w.add_token_types([1] * VOCAB)
    w.add_eos_token_id(3)
    for key, value in (extra or {}).items():
        w.add_key_value(key, *value)
    for name, t in tensors.items():
        arr, qtype = t if isinstance(t, tuple) else (t, None)
        w.add_tensor(name, arr, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def random_tensors(tied: bool = True, n_layers: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in gguf_names(n_layers, tied).items()}


def test_tiny_gguf_loads(tmp_path):
    tensors = random_tensors(tied=True)
    stored = dict(tensors)
    stored["token_embd.weight"] = (gguf.quants.quantize(tensors["token_embd.weight"], Q.Q8_0), Q.Q8_0)
    stored["blk.1.ffn_up.weight"] = tensors["blk.1.ffn_up.weight"].astype(np.float16)
    config, sd, meta = load_gguf(write_gguf(tmp_path / "tiny.gguf", stored))

    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (H, 2, FFN)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (HEADS, KV, VOCAB)
    assert config.tie_word_embeddings and config.eos_token_id == 3 and config.rope_theta == 1e6
    assert sorted(sd) == sorted(state_dict_keys(config))
    assert meta["tokenizer.ggml.tokens"][:2] == ["t0", "t1"]
    assert torch.equal(sd["model.layers.0.self_attn.q_proj.weight"], torch.from_numpy(tensors["blk.0.attn_q.weight"]))
    assert torch.equal(sd["model.layers.1.self_attn.k_proj.bias"], torch.from_numpy(tensors["blk.1.attn_k.bias"]))
    assert torch.equal(sd["model.layers.1.mlp.up_proj.weight"],
                       torch.from_numpy(tensors["blk.1.ffn_up.weight"].astype(np.float16).astype(np.float32)))
    embd = stored["token_embd.weight"][0]
    assert torch.equal(sd["model.embed_tokens.weight"], reference(embd, Q.Q8_0, (VOCAB, H)))
    assert torch.equal(sd["model.norm.weight"], torch.from_numpy(tensors["output_norm.weight"]))

    _, sd16, _ = load_gguf(tmp_path / "tiny.gguf", dtype=torch.bfloat16)
    assert sd16["model.norm.weight"].dtype == torch.bfloat16


def test_untied_when_output_present(tmp_path):
    tensors = random_tensors(tied=False)
    config, sd, _ = load_gguf(write_gguf(tmp_path / "untied.gguf", tensors))
    assert not config.tie_word_embeddings
    assert torch.equal(sd["lm_head.weight"], torch.from_numpy(tensors["output.weight"]))


def test_metadata_matches_gguf_reader(tmp_path):
    extra = {"test.bool": (True, gguf.GGUFValueType.BOOL), "test.ints": ([1, -2, 3], gguf.GGUFValueType.ARRAY),
             "test.floats": ([0.5, 1.5], gguf.GGUFValueType.ARRAY), "test.str": ("héllo", gguf.GGUFValueType.STRING)}
    path = write_gguf(tmp_path / "meta.gguf", random_tensors(), extra=extra)
    ours = read_metadata(path)
    reader = gguf.GGUFReader(path)
    for key, field in reader.fields.items():
        if not key.startswith("GGUF."):
            assert ours[key] == field.contents(), key
    assert ours["vocab_size"] == VOCAB and ours["tie_word_embeddings"] is True


def test_moe_experts_are_split(tmp_path):
    rng = np.random.default_rng(0)
    E, W, SH = 4, 32, 64
    tensors = {k: v for k, v in random_tensors(n_layers=1).items() if "ffn_" not in k or "norm" in k}
    for w, shape in (("gate", (E, W, H)), ("up", (E, W, H)), ("down", (E, H, W))):
        tensors[f"blk.0.ffn_{w}_exps.weight"] = rng.standard_normal(shape).astype(np.float32)
        tensors[f"blk.0.ffn_{w}_shexp.weight"] = rng.standard_normal(
            (SH, H) if w != "down" else (H, SH)).astype(np.float32)
    tensors["blk.0.ffn_gate_inp.weight"] = rng.standard_normal((E, H)).astype(np.float32)
    tensors["blk.0.ffn_gate_inp_shexp.weight"] = rng.standard_normal(H).astype(np.float32)
    U32 = gguf.GGUFValueType.UINT32
    extra = {"qwen2moe.expert_count": (E, U32), "qwen2moe.expert_used_count": (2, U32),
             "qwen2moe.expert_feed_forward_length": (W, U32),
             "qwen2moe.expert_shared_feed_forward_length": (SH, U32)}
    config, sd, _ = load_gguf(write_gguf(tmp_path / "moe.gguf", tensors, arch="qwen2moe", n_layers=1, extra=extra))

    assert config.model_type == "qwen2_moe" and config.num_experts == E and config.moe_intermediate_size == W
    assert sorted(sd) == sorted(state_dict_keys(config))
    for e in range(E):
        for w in ("gate", "up", "down"):
            want = torch.from_numpy(tensors[f"blk.0.ffn_{w}_exps.weight"][e])
            assert torch.equal(sd[f"model.layers.0.mlp.experts.{e}.{w}_proj.weight"], want)
    assert sd["model.layers.0.mlp.shared_expert_gate.weight"].shape == (1, H)
    assert torch.equal(sd["model.layers.0.mlp.gate.weight"], torch.from_numpy(tensors["blk.0.ffn_gate_inp.weight"]))
    assert sd["model.layers.0.mlp.shared_expert.down_proj.weight"].shape == (H, SH)


# -- errors ------------------------------------------------------------------------------
@pytest.fixture
def tiny(tmp_path) -> Path:
    return write_gguf(tmp_path / "tiny.gguf", random_tensors())


def test_not_a_gguf(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 this is a zip")
    with pytest.raises(WeightsError, match="not a GGUF file"):
        load_gguf(tmp_path / "x.gguf")
    with pytest.raises(WeightsError, match="no GGUF file"):
        load_gguf(tmp_path / "absent.gguf")


def test_truncated_header(tiny):
    tiny.write_bytes(tiny.read_bytes()[:200])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        read_metadata(tiny)


def test_tensor_past_end_of_file(tiny):
    tiny.write_bytes(tiny.read_bytes()[:-1000])
    with pytest.raises(WeightsError, match="past the end of the file.*truncated"):
        load_gguf(tiny)


def test_corrupt_header_values(tiny):
    data = bytearray(tiny.read_bytes())
    data[16:24] = (10**15).to_bytes(8, "little")  # absurd key/value count
    tiny.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        load_gguf(tiny)


def nested_arrays(path: Path, depth: int) -> Path:
    """A GGUF v3 header of one key whose value is `depth` arrays, each holding the next, the
    innermost an empty array of uint8; no tensors."""
    import struct

    key = b"test.nested"
    body = struct.pack("<QQ", 0, 1) + struct.pack("<Q", len(key)) + key + struct.pack("<I", 9)  # 9: ARRAY
    body += struct.pack("<IQ", 9, 1) * (depth - 1) + struct.pack("<IQ", 0, 0)  # 0: UINT8
    path.write_bytes(b"GGUF" + struct.pack("<I", 3) + body)
    return path


def test_arrays_nested_past_the_bound_are_our_error_not_a_recursion_error(tmp_path):
    # 100,000 levels is 1.2 MB of header: unbounded, the parser's recursion ends in RecursionError
    for depth in (qgguf.MAX_ARRAY_DEPTH + 1, 100_000):
        with pytest.raises(WeightsError, match="nested more than 8 deep.*re-download"):
            read_metadata(nested_arrays(tmp_path / f"deep{depth}.gguf", depth))


def test_arrays_nested_within_the_bound_are_read(tmp_path):
    expected: list = []
    for _ in range(qgguf.MAX_ARRAY_DEPTH - 1):
        expected = [expected]
    assert read_metadata(nested_arrays(tmp_path / "ok.gguf", qgguf.MAX_ARRAY_DEPTH))["test.nested"] == expected


def test_split_gguf_is_refused(tmp_path):
    path = write_gguf(tmp_path / "x-00001-of-00002.gguf", random_tensors(),
                      extra={"split.count": (2, gguf.GGUFValueType.UINT16)})
    with pytest.raises(WeightsError, match="split GGUF; merge the parts"):
        load_gguf(path)


def test_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "llama.gguf", random_tensors(), arch="llama")
    with pytest.raises(Qwen2Error, match="'llama' is not supported"):
        load_gguf(path)


def test_unsupported_tensor_type(tmp_path):
    tensors = random_tensors()
    tensors["blk.0.attn_norm.weight"] = np.zeros(H, dtype=np.int32)
    with pytest.raises(WeightsError, match="blk.0.attn_norm.weight is stored as I32"):
        load_gguf(write_gguf(tmp_path / "i32.gguf", tensors))


def test_missing_and_unexpected_tensors(tmp_path):
    tensors = random_tensors()
    del tensors["blk.1.ffn_down.weight"]
    with pytest.raises(WeightsError, match=r"lacks 1 tensor.*model.layers.1.mlp.down_proj.weight"):
        load_gguf(write_gguf(tmp_path / "missing.gguf", tensors))
    tensors = random_tensors() | {"blk.0.attn_q_norm.weight": np.zeros(H, np.float32)}
    with pytest.raises(WeightsError, match="unexpected tensor 'blk.0.attn_q_norm.weight'"):
        load_gguf(write_gguf(tmp_path / "extra.gguf", tensors))


# -- the default model -------------------------------------------------------------------
@pytest.fixture(scope="module")
def default_loaded(default_gguf):
    return load_gguf(default_gguf)


def test_default_model_config(default_loaded):
    config, sd, meta = default_loaded
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (24, 896, 4864)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (14, 2, 64)
    assert config.vocab_size == 151936 and not config.tie_word_embeddings
    assert config.eos_token_id == 151645 and config.bos_token_id == 151643
    assert sorted(sd) == sorted(state_dict_keys(config))
    assert len(meta["tokenizer.ggml.tokens"]) == 151936 and len(meta["tokenizer.ggml.merges"]) == 151387


def test_default_model_tensors_match_reference(default_gguf, default_loaded):
    """Real Q5_0, Q8_0, Q4_K and Q6_K tensors against gguf-py's reference dequantization."""
    _, sd, _ = default_loaded
    data, _, infos = qgguf._open(default_gguf)
    infos = {i.name: i for i in infos}
    for name, ours, qtype in [
        ("token_embd.weight", "model.embed_tokens.weight", Q.Q5_0),
        ("output.weight", "lm_head.weight", Q.Q8_0),
        ("blk.11.ffn_down.weight", "model.layers.11.mlp.down_proj.weight", Q.Q4_K),
        ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight", Q.Q6_K),
    ]:
        info = infos[name]
        assert info.qtype == qtype
        rows = 4096 if info.shape[0] > 4096 else info.shape[0]  # the reference is slow on 151936 rows
        row_bytes = info.shape[-1] // gguf.GGML_QUANT_SIZES[qtype][0] * gguf.GGML_QUANT_SIZES[qtype][1]
        raw = np.asarray(data[info.offset : info.offset + rows * row_bytes])
        assert torch.equal(sd[ours][:rows], reference(raw, qtype, (rows, info.shape[-1]))), name


@pytest.fixture(scope="module")
def mini_gguf(default_gguf, tmp_path_factory) -> Path:
    """Two real layers (0 and 11: Q5_0, Q8_0, Q6_K, Q4_K, F32) and 512 vocabulary rows of the
    default model, as a 2-layer GGUF small enough for transformers to load in a second."""
    data, meta, infos = qgguf._open(default_gguf)
    w = gguf.GGUFWriter(tmp_path_factory.mktemp("mini") / "mini.gguf", "qwen2")
    for key in ("context_length", "embedding_length", "feed_forward_length", "attention.head_count",
                "attention.head_count_kv"):
        w.add_uint32(f"qwen2.{key}", meta[f"qwen2.{key}"])
    w.add_block_count(2)
    w.add_rope_freq_base(meta["qwen2.rope.freq_base"])
    w.add_layer_norm_rms_eps(meta["qwen2.attention.layer_norm_rms_epsilon"])
    w.add_token_list(meta["tokenizer.ggml.tokens"][:512])
    w.add_eos_token_id(3)
    for info in infos:
        if info.name.startswith("blk.") and not info.name.startswith(("blk.0.", "blk.11.")):
            continue
        name = info.name.replace("blk.11.", "blk.1.")
        qtype = Q(info.qtype)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        rows = min(512, info.shape[0]) if len(info.shape) == 2 else 1
        n = rows * (info.shape[-1] // block * size)
        raw = np.asarray(data[info.offset : info.offset + n]).reshape(rows, -1)
        w.add_tensor(name, raw if len(info.shape) == 2 else raw.reshape(-1), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return w.path


def transformers_tensors(path: Path) -> dict[str, torch.Tensor]:
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]


def test_real_quantized_tensors_match_transformers(mini_gguf):
    config, ours, _ = load_gguf(mini_gguf)
    theirs = transformers_tensors(mini_gguf)
    assert config.vocab_size == 512 and not config.tie_word_embeddings
    assert sorted(ours) == sorted(theirs)
    for name, t in theirs.items():
        assert torch.equal(ours[name], t), name


@pytest.mark.slow
def test_default_model_matches_transformers(default_gguf, default_loaded):
    """Every tensor of the default model against transformers' own GGUF loading (~40 s)."""
    _, ours, _ = default_loaded
    theirs = transformers_tensors(default_gguf)
    assert sorted(ours) == sorted(theirs)
    for name, t in theirs.items():
        assert torch.equal(ours[name], t), name
