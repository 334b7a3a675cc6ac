"""GGUF writing: models round trip through our reader (config, tensors, tokenizer, chat template),
Q4_K packs the block layout gguf-py dequantizes, llama.cpp (llama-cpp-python) loads our files and
continues prompts greedily as we do, and bad requests fail in one line."""

import dataclasses
import importlib.util
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from qwen2.cli import main
from qwen2.errors import ConfigError, OptionError, WeightsError
from qwen2.loading import load_model
from qwen2.model import Transformer
from qwen2.tokenizer import Tokenizer
from qwen2.weights import load_checkpoint
from qwen2.weights.export import export_hf
from qwen2.weights.gguf import load_gguf, read_metadata
from qwen2.weights.gguf_export import export_gguf, quantize_q4_k, storage_type
from tests.conftest import tiny_config

MULTILINGUAL = [
    "Hello, world! 12345 + 678 = 13023",
    "def f(x):\n    return x ** 2  # squares\n\n\n",
    "你好，世界！今天天气很好。",
    "Привет, мир! Ça va? Grüße aus Köln.",
    "こんにちは 🌍🚀 مرحبا بالعالم",
    "<|im_start|>user\nhi<|im_end|>\n<tool_call>{\"a\": 1}</tool_call>",
]
MOE = dict(model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
           shared_expert_intermediate_size=48)
# 256-wide rows take Q4_K, 96-wide ones fall back to Q5_0 (q4_k) or take Q8_0, 48-wide ones F16.
SMALL = dict(vocab_size=320, hidden_size=256, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
             eos_token_id=258, bos_token_id=256)


def written_values(name: str, t: torch.Tensor, type: str) -> torch.Tensor:
    """What a tensor should read back as: its value after the storage type's own round trip in gguf-py."""
    qtype = storage_type(name, tuple(t.shape), type)
    x = t.float().numpy()
    raw = quantize_q4_k(x) if qtype == Q.Q4_K else gguf.quants.quantize(x, qtype)
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32))


def gguf_name(key: str) -> str:
    """Enough of the HF -> GGUF map for storage_type: which tensors are routers and which are vectors."""
    return "blk.0.ffn_gate_inp.weight" if key.endswith("mlp.gate.weight") else key


def assert_round_trip(config, state, tokenizer, path, type):
    counts = export_gguf(config, state, tokenizer, path, type)
    back_config, back, meta = load_gguf(path)
    # GGUF holds floats as float32, and the pad id is the tokenizer's
    f32 = {k: float(np.float32(getattr(config, k))) for k in ("rms_norm_eps", "rope_theta")}
    assert back_config == dataclasses.replace(config, pad_token_id=tokenizer.pad_token_id, **f32)
    expected_keys = set(state) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    assert set(back) == expected_keys
    for key in expected_keys:
        shape = (state[key].shape[-1],) if key.endswith("shared_expert_gate.weight") else state[key].shape
        want = written_values(gguf_name(key), state[key].reshape(shape), type).reshape(state[key].shape)
        assert torch.equal(back[key], want), key
    return counts, meta


def random_state(config) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return Transformer(config).state_dict()


@pytest.fixture(scope="module")
def tiny_gguf_files(tiny_hf, tmp_path_factory):
    """The tiny model, read from its HF folder, written as f32 and f16 GGUF files."""
    config, state, tokenizer = load_checkpoint(tiny_hf)
    folder = tmp_path_factory.mktemp("tiny-gguf-out")
    for type in ("f32", "f16"):
        export_gguf(config, state, tokenizer, folder / f"tiny-{type}.gguf", type)
    return {type: folder / f"tiny-{type}.gguf" for type in ("f32", "f16")}


# -- Q4_K --------------------------------------------------------------------------------
def test_q4_k_packs_exactly_representable_values_exactly():
    rng = np.random.default_rng(0)
    n = 6  # blocks
    d, dmin = np.float32(2.0**-6), np.float32(2.0**-7)  # dyadic, so every value below is exact in float32
    sc, m = rng.integers(1, 64, (n, 8)), rng.integers(0, 64, (n, 8))
    sc[:, 3], m[:, 6] = 63, 63  # the block maxima fix d and dmin
    q = rng.integers(0, 16, (n, 8, 32))
    q[..., 0], q[..., 1] = 0, 15  # each sub-block spans its whole range
    x = (d * sc[..., None] * q - dmin * m[..., None]).astype(np.float32).reshape(2, -1)
    raw = quantize_q4_k(x)
    assert raw.shape == (2, 3 * 144) and raw.dtype == np.uint8
    assert np.array_equal(gguf.quants.dequantize(raw, Q.Q4_K), x)


def test_q4_k_error_is_that_of_4_bits_on_random_weights():
    x = np.random.default_rng(1).standard_normal((32, 1024)).astype(np.float32)
    back = gguf.quants.dequantize(quantize_q4_k(x), Q.Q4_K)
    rel_rms = np.sqrt(((back - x) ** 2).mean() / (x**2).mean())
    assert rel_rms < 0.09  # 16 levels over a 32-weight range of a normal sample: step / sqrt(12) ~ 0.08
    assert abs((back - x).mean()) < 1e-3


@pytest.mark.parametrize("shape, type, expected", [
    ((896, 896), "q4_k", Q.Q5_0),  # Qwen2.5-0.5B's rows are not a multiple of 256: llama.cpp's fallback
    ((896, 4864), "q4_k", Q.Q4_K),
    ((64, 48), "q4_k", Q.F16),
    ((64, 48), "q8_0", Q.F16),
    ((64, 64), "q8_0", Q.Q8_0),
    ((64, 64), "bf16", Q.BF16),
    ((896,), "q4_k", Q.F32),
    ((896,), "f16", Q.F32),
])
def test_storage_type_per_tensor(shape, type, expected):
    assert storage_type("blk.0.attn_q.weight", shape, type) == expected


def test_moe_router_stays_f32():
    assert storage_type("blk.3.ffn_gate_inp.weight", (64, 896), "q8_0") == Q.F32


# -- round trips -------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("type", ["f32", "f16", "bf16", "q8_0", "q4_k"])
def test_model_round_trips_through_our_reader(type, tied, byte_tokenizer, tmp_path):
    config = tiny_config(**SMALL, tie_word_embeddings=tied)
    counts, meta = assert_round_trip(config, random_state(config), byte_tokenizer, tmp_path / "m.gguf", type)
    assert sum(counts.values()) == 27 - tied
    # every type keeps the output norm and per layer two norms and three biases in F32
    assert counts["F32"] == (27 - tied if type == "f32" else 1 + 2 * 5)
    assert meta["general.file_type"] == {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7, "q4_k": 14}[type]
    if type == "q4_k":
        assert counts == {"Q4_K": 2 * 6 + 2 - tied, "Q5_0": 2, "F32": 11}  # down_proj's 96-wide rows: Q5_0


@pytest.mark.parametrize("type", ["f32", "q8_0", "q4_k"])
def test_moe_round_trips_with_stacked_experts(type, byte_tokenizer, tmp_path):
    config = tiny_config(**SMALL | MOE)
    counts, meta = assert_round_trip(config, random_state(config), byte_tokenizer, tmp_path / "moe.gguf", type)
    assert meta["general.architecture"] == "qwen2moe" and meta["qwen2moe.expert_count"] == 4
    assert meta["qwen2moe.expert_shared_feed_forward_length"] == 48
    if type != "f32":
        assert counts["F32"] == 1 + 2 * (5 + 2)  # per layer also the router and the shared-expert gate
        assert counts["F16"] == 2  # the shared expert's 48-wide down_proj rows fit no block type


def test_yarn_scaling_is_kept(byte_tokenizer, tmp_path):
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}
    config = tiny_config(**SMALL, rope_scaling=yarn, max_position_embeddings=2048)
    _, meta = assert_round_trip(config, random_state(config), byte_tokenizer, tmp_path / "yarn.gguf", "f32")
    assert meta["qwen2.rope.scaling.type"] == "yarn"


def test_tokenizer_metadata_matches_llama_cpp_converter(tiny_gguf_files, default_gguf):
    """The default model's GGUF came from llama.cpp's converter; our writer gives the same vocabulary."""
    ours, theirs = read_metadata(tiny_gguf_files["f32"]), read_metadata(default_gguf)
    for key in ("tokens", "token_type", "merges", "model", "pre", "eos_token_id", "bos_token_id",
                "padding_token_id", "add_bos_token"):
        assert ours[f"tokenizer.ggml.{key}"] == theirs[f"tokenizer.ggml.{key}"], key
    assert ours["tokenizer.chat_template"] == theirs["tokenizer.chat_template"]


def test_hf_folder_survives_with_its_tokenizer(tiny_gguf_files, tiny_model, default_tokenizer):
    config, state, meta = load_gguf(tiny_gguf_files["f32"])
    assert config.num_hidden_layers == 2 and config.vocab_size == 151936 and config.tie_word_embeddings
    assert all(torch.equal(t, tiny_model.state_dict()[k]) for k, t in state.items())
    back = Tokenizer.from_gguf_metadata(meta)
    for text in MULTILINGUAL:
        ids = default_tokenizer.encode(text)
        assert back.encode(text) == ids and back.decode(ids) == text
    assert back.chat_template == default_tokenizer.chat_template
    messages = [{"role": "user", "content": "¿Qué tal?"}]
    assert back.apply_chat_template(messages) == default_tokenizer.apply_chat_template(messages)
    assert back.eos_token_ids == default_tokenizer.eos_token_ids


# -- bad input ---------------------------------------------------------------------------
def test_refusals(byte_tokenizer, tmp_path):
    config = tiny_config(**SMALL)
    state = random_state(config)
    with pytest.raises(OptionError, match="does not exist"):
        export_gguf(config, state, byte_tokenizer, tmp_path / "no" / "m.gguf")
    with pytest.raises(OptionError, match="unknown GGUF type"):
        export_gguf(config, state, byte_tokenizer, tmp_path / "m.gguf", "q3_k")
    mixed = tiny_config(**SMALL | MOE, mlp_only_layers=[0])
    with pytest.raises(ConfigError, match="dense layers"):
        export_gguf(mixed, random_state(mixed), byte_tokenizer, tmp_path / "m.gguf", "q8_0")
    huge = state | {"model.norm.weight": state["model.norm.weight"] * 1e6}
    export_gguf(config, huge, byte_tokenizer, tmp_path / "m.gguf", "f16")  # norms are F32: fine
    huge["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"] * 1e8
    with pytest.raises(WeightsError, match="bf16"):
        export_gguf(config, huge, byte_tokenizer, tmp_path / "m.gguf", "f16")
    lora = state | {"model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 256)}
    with pytest.raises(WeightsError, match="merge LoRA"):
        export_gguf(config, lora, byte_tokenizer, tmp_path / "m.gguf")
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no partial files left behind


def test_cli_writes_a_gguf_from_an_hf_folder(tiny_hf, tmp_path):
    """A real `qwen2 convert` process, HF folder in, q8_0 GGUF out."""
    out = tmp_path / "tiny-q8.gguf"
    result = subprocess.run([sys.executable, "-m", "qwen2", "convert", str(tiny_hf), str(out), "--type", "q8_0"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"wrote {out} (q8_0:" in result.stdout
    meta = read_metadata(out)
    assert meta["general.name"] == tiny_hf.name and meta["general.file_type"] == 7


@pytest.fixture(scope="module")
def moe_hf(byte_tokenizer, tmp_path_factory):
    """A MoE whose second layer is dense, which llama.cpp's qwen2moe cannot express."""
    config = tiny_config(**SMALL | MOE, mlp_only_layers=[1])
    folder = tmp_path_factory.mktemp("moe-hf")
    export_hf(config, random_state(config), byte_tokenizer, folder)
    return folder


@pytest.mark.parametrize("args, phrase", [
    (["{hf}", "{tmp}/missing/out.gguf"], "does not exist"),
    (["{hf}", "{tmp}/out.gguf", "--type", "q3_k"], "invalid choice: 'q3_k'"),
    (["{hf}", "{tmp}/out.gguf", "--dtype", "float16"], "--dtype is for an HF folder"),
    (["{hf}", "{tmp}/out", "--type", "q8_0"], "--type is the tensor type of a GGUF file"),
    (["{moe}", "{tmp}/out.gguf", "--type", "q4_k"], "dense layers between the MoE layers"),
])
def test_cli_bad_requests_fail_in_one_line(args, phrase, tiny_hf, moe_hf, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["convert", *[a.format(hf=tiny_hf, moe=moe_hf, tmp=tmp_path) for a in args]])
    err = capsys.readouterr().err
    assert exit.value.code in (1, 2) and len(err.strip().splitlines()) == 1 and phrase in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.gguf").exists()


# -- llama.cpp as the oracle -------------------------------------------------------------
needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python (the llama.cpp oracle) is not installed")
PROMPTS = ["def quicksort(arr):", "The capital of France is", "你好，世界", "<|im_start|>user\nhi<|im_end|>\n"]


def llama_greedy(path, prompts: list[list[int]], n: int) -> list[list[int]]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False)
    out = []
    for ids in prompts:
        tokens = []
        for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            tokens.append(token)
            if len(tokens) == n:
                break
        out.append(tokens)
    return out


def our_greedy(path, prompts: list[list[int]], n: int) -> list[list[int]]:
    model, _ = load_model(path, quant="none", dtype="float32")
    out = []
    for ids in prompts:
        ids = list(ids)
        with torch.no_grad():
            for _ in range(n):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        out.append(ids[-n:])
    return out


@needs_llama_cpp
@pytest.mark.parametrize("type, tolerance", [("f32", 1e-4), ("f16", 1e-2)])
def test_llama_cpp_computes_our_logits_from_our_gguf(type, tolerance, tiny_gguf_files, default_tokenizer):
    """Logits at every prompt position, relative to the largest; the greedy continuation of this random
    model only repeats the last token (its tied embedding dominates), so logits are the sharper check."""
    from llama_cpp import Llama

    path = tiny_gguf_files[type]
    model, _ = load_model(path, quant="none", dtype="float32")
    llm = Llama(model_path=str(path), n_ctx=256, n_threads=2, logits_all=True, verbose=False)
    for prompt in PROMPTS:
        ids = default_tokenizer.encode(prompt)
        llm.reset()
        llm.eval(ids)
        theirs = torch.from_numpy(np.array(llm.scores[: len(ids)]))
        with torch.no_grad():
            ours = model(torch.tensor([ids]))[0]
        assert (theirs - ours).abs().max() < tolerance * ours.abs().max(), prompt
        assert torch.equal(theirs.topk(5).indices, ours.topk(5).indices), prompt


@needs_llama_cpp
def test_llama_cpp_tokenizes_as_we_do(tiny_gguf_files, default_tokenizer):
    from llama_cpp import Llama

    llm = Llama(model_path=str(tiny_gguf_files["f16"]), n_ctx=64, vocab_only=True, verbose=False)
    for text in MULTILINGUAL:
        ids = default_tokenizer.encode(text)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, text
        assert llm.detokenize(ids, special=True) == text.encode()


@needs_llama_cpp
@pytest.mark.slow
def test_llama_cpp_agrees_on_the_default_model_as_q8_0(default_gguf, default_tokenizer, tmp_path):
    config, state, tokenizer = load_checkpoint(default_gguf)
    path = tmp_path / "default-q8_0.gguf"
    export_gguf(config, state, tokenizer, path, "q8_0")
    del state
    prompts = [default_tokenizer.encode("def fibonacci(n):")]
    assert llama_greedy(path, prompts, 16) == our_greedy(path, prompts, 16)
