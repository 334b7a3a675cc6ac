"""Write a model as a GGUF file: llama.cpp's format, which Ollama and LM Studio load too.

The inverse of qwen2.weights.gguf: the same tensor names (tied embeddings write no output.weight,
experts are stacked [E, out, in]), `qwen2` or `qwen2moe` metadata, and the tokenizer as llama.cpp's
byte-level BPE wants it: tokens padded to the embedding's rows with `[PAD{i}]`, token types,
merges, special ids, no BOS added, and the chat template. gguf-py writes the file and quantizes
BF16, Q8_0 and Q5_0; it cannot quantize Q4_K, so `quantize_q4_k` here does, with plain min-max
scales per 32 weights (llama.cpp's own quantizer searches for better scales, so its Q4_K is a
little more accurate).

`type` names how the weight matrices are stored: f32, f16, bf16, q8_0 or q4_k. As in llama.cpp,
1-D tensors (norms, biases, the shared-expert gate) and MoE routers stay F32 whatever the type,
and a matrix whose rows do not split into the type's blocks falls back: Q4_K to Q5_0 (32-weight
blocks), as llama.cpp's quantizer does, then to F16; Q8_0 to F16. Qwen2.5-0.5B's 896-wide rows
take Q5_0 in a q4_k file.

Not covered: what llama.cpp's qwen2 / qwen2moe graphs cannot express (MoE models with dense
layers or normalised top-k routing, no q/k/v bias, a head_dim other than hidden/heads, rope
scaling other than YaRN). Sliding-window and Dual Chunk Attention settings are not written:
llama.cpp runs neither for qwen2.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import gguf
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType, RopeScalingType, TokenType
from tqdm import tqdm

from qwen2.config import Qwen2Config
from qwen2.errors import ConfigError, OptionError, TokenizerError, WeightsError
from qwen2.files import write_atomically
from qwen2.tokenizer import QWEN2_PRETOKENIZE_REGEX
from qwen2.weights.gguf import GLOBAL_TENSORS, LAYER_TENSORS
from qwen2.weights.hf import state_dict_keys

if TYPE_CHECKING:
    from qwen2.tokenizer import Tokenizer

Q = GGMLQuantizationType
# --type -> (the matrices' type, then the fallbacks for rows that do not split into its blocks)
GGUF_TYPES = {
    "f32": (Q.F32,), "f16": (Q.F16,), "bf16": (Q.BF16,), "q8_0": (Q.Q8_0, Q.F16), "q4_k": (Q.Q4_K, Q.Q5_0, Q.F16),
}
# Q4_K with other types where rows force it is llama.cpp's "mostly Q4_K_S".
_FILE_TYPES = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16,
               "q8_0": LlamaFileType.MOSTLY_Q8_0, "q4_k": LlamaFileType.MOSTLY_Q4_K_S}
_F16_MAX = float(np.finfo(np.float16).max)
_CHUNK_WEIGHTS = 1 << 22  # quantize a big matrix a few million weights at a time to bound temporaries


def check_target(path: str | Path, type: str) -> Path:
    """The output path, checked before any model is loaded."""
    path = Path(path)
    if type not in GGUF_TYPES:
        raise OptionError(f"unknown GGUF type {type!r}; choose one of {', '.join(GGUF_TYPES)}")
    if not path.parent.is_dir():
        raise OptionError(f"the folder {path.parent} does not exist; create it first or write the GGUF elsewhere")
    if path.is_dir():
        raise OptionError(f"{path} is a folder; name the GGUF file to write, e.g. {path / 'model.gguf'}")
    return path


def check_representable(config: Qwen2Config) -> None:
    """Raise ConfigError for a model llama.cpp's qwen2 / qwen2moe graphs would run differently."""
    problems = []
    if config.head_dim != config.hidden_size // config.num_attention_heads:
        problems.append(f"head_dim {config.head_dim} is not hidden_size / num_attention_heads")
    if not config.qkv_bias:
        problems.append("q/k/v projections without bias")
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("default", "yarn"):
        problems.append(f"rope scaling {kind!r} (only YaRN is written)")
    if config.is_moe:
        if any(not config.layer_is_sparse(i) for i in range(config.num_hidden_layers)):
            problems.append("dense layers between the MoE layers (mlp_only_layers / decoder_sparse_step)")
        if config.norm_topk_prob:
            problems.append("normalised top-k routing (norm_topk_prob)")
    if problems:
        raise ConfigError(f"this model cannot be written as a GGUF that llama.cpp runs the same: "
                          f"{'; '.join(problems)}; convert it to an HF folder instead")


# -- Q4_K --------------------------------------------------------------------------------
def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """float32 [..., n * 256] -> Q4_K bytes [..., n * 144] (ggml's block_q4_K, which gguf-py dequantizes).

    A block holds 256 weights as 8 sub-blocks of 32: w = d * sc[j] * q - dmin * m[j], with q in
    0..15, 6-bit sc and m, and fp16 d and dmin."""
    block_size, type_size = GGML_QUANT_SIZES[Q.Q4_K]
    flat = x.reshape(-1, block_size)
    out = np.empty((len(flat), type_size), np.uint8)
    step = max(1, _CHUNK_WEIGHTS // block_size)
    for i in range(0, len(flat), step):
        out[i : i + step] = _q4_k_blocks(flat[i : i + step].astype(np.float32))
    return out.reshape(*x.shape[:-1], -1)


def _q4_k_blocks(x: np.ndarray) -> np.ndarray:
    n = len(x)
    sub = x.reshape(n, 8, 32)
    low = np.minimum(sub.min(-1), 0)  # a sub-block's offset is never positive: its zero stays exact
    scale, mins = (sub.max(-1) - low) / 15, -low  # (n, 8)
    d = (scale.max(-1, keepdims=True) / 63).astype(np.float16)
    dmin = (mins.max(-1, keepdims=True) / 63).astype(np.float16)
    sc = _ratio(scale, d.astype(np.float32), 63)
    m = _ratio(mins, dmin.astype(np.float32), 63)
    step = (d.astype(np.float32) * sc)[..., None]
    offset = (dmin.astype(np.float32) * m)[..., None]
    q = _ratio(sub + offset, step, 15)  # (n, 8, 32)

    scales = np.empty((n, 12), np.uint8)  # sub-blocks 4..7 keep their top 2 bits in the first 8 bytes
    scales[:, 0:4] = sc[:, :4] | (sc[:, 4:] >> 4) << 6
    scales[:, 4:8] = m[:, :4] | (m[:, 4:] >> 4) << 6
    scales[:, 8:12] = (sc[:, 4:] & 0xF) | (m[:, 4:] & 0xF) << 4
    pairs = q.reshape(n, 4, 2, 32)  # byte l of 32-byte group g: sub-block 2g low nibble, 2g+1 high
    qs = (pairs[:, :, 0] | pairs[:, :, 1] << 4).reshape(n, 128)
    return np.concatenate([d.view(np.uint8), dmin.view(np.uint8), scales, qs], axis=1)


def _ratio(a: np.ndarray, b: np.ndarray, top: int) -> np.ndarray:
    """round(a / b) clipped to 0..top as uint8, 0 where b is 0."""
    r = np.divide(a, b, out=np.zeros(np.broadcast_shapes(a.shape, b.shape), np.float32), where=b > 0)
    return np.clip(np.rint(r), 0, top).astype(np.uint8)


# -- tensors -----------------------------------------------------------------------------
def _gguf_tensors(config: Qwen2Config, state_dict: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) in file order, experts stacked."""
    expected = state_dict_keys(config)
    missing = [k for k in expected if k not in state_dict]
    extra = sorted(set(state_dict) - set(expected) - {"lm_head.weight"})
    if missing:
        raise WeightsError(f"the model lacks {', '.join(missing[:3])}; the checkpoint is incomplete")
    if extra:
        raise WeightsError(f"the model has tensors a GGUF has no name for ({', '.join(extra[:3])}); merge LoRA "
                           "adapters into the weights first")
    for theirs, ours in GLOBAL_TENSORS.items():
        if ours in state_dict and not (ours == "lm_head.weight" and config.tie_word_embeddings):
            yield theirs, state_dict[ours]
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        for theirs, ours in LAYER_TENSORS.items():
            if "{e}" in ours:
                keys = [prefix + ours.format(e=e) for e in range(config.num_experts)]
                if keys and keys[0] in state_dict:
                    yield f"blk.{i}.{theirs}", torch.stack([state_dict[k] for k in keys])  # (E, out, in)
            elif prefix + ours in state_dict:
                t = state_dict[prefix + ours]
                # a [1, H] Linear that GGUF stores as a vector
                yield f"blk.{i}.{theirs}", t.reshape(-1) if theirs.startswith("ffn_gate_inp_shexp") else t


def storage_type(name: str, shape: tuple[int, ...], type: str) -> GGMLQuantizationType:
    """How one tensor is stored for a --type (see the module docstring)."""
    if len(shape) == 1 or name.endswith("ffn_gate_inp.weight"):
        return Q.F32
    return next(t for t in GGUF_TYPES[type] if shape[-1] % GGML_QUANT_SIZES[t][0] == 0)


def encode(name: str, t: torch.Tensor, qtype: GGMLQuantizationType) -> np.ndarray:
    """A tensor's GGUF data: float32/float16 values, or the raw bytes of a block type."""
    x = t.detach().to(torch.float32).cpu().numpy()
    if qtype == Q.F16 and np.abs(x).max(initial=0) > _F16_MAX:
        raise WeightsError(f"{name} has values beyond float16's range ({_F16_MAX:.0f}); write it with "
                           "--type bf16 or f32")
    if qtype == Q.Q4_K:
        return quantize_q4_k(x)
    return gguf.quants.quantize(x, qtype)


# -- metadata ----------------------------------------------------------------------------
def _add_config(w: gguf.GGUFWriter, config: Qwen2Config) -> None:
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    if config.rope_scaling:  # YaRN; check_representable refused the rest
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(config.rope_scaling["factor"])
        w.add_rope_scaling_orig_ctx_len(config.rope_scaling["original_max_position_embeddings"])
    if config.is_moe:
        w.add_expert_count(config.num_experts)
        w.add_expert_used_count(config.num_experts_per_tok)
        w.add_expert_feed_forward_length(config.moe_intermediate_size)
        w.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)


def _pre_tokenizer_regexes(node: object) -> list[str]:
    if isinstance(node, dict):
        own = [node["pattern"]["Regex"]] if node.get("type") == "Split" and "Regex" in node.get("pattern", {}) else []
        return own + [r for v in node.values() for r in _pre_tokenizer_regexes(v)]
    if isinstance(node, list):
        return [r for v in node for r in _pre_tokenizer_regexes(v)]
    return []


def _add_tokenizer(w: gguf.GGUFWriter, tokenizer: Tokenizer, config: Qwen2Config) -> None:
    spec = json.loads(tokenizer.to_json())
    model = spec["model"]
    if model.get("type") != "BPE" or _pre_tokenizer_regexes(spec.get("pre_tokenizer")) != [QWEN2_PRETOKENIZE_REGEX]:
        raise TokenizerError("the tokenizer is not Qwen2's byte-level BPE with Qwen2's pre-tokenizer, which is the "
                             "only one a qwen2 GGUF declares; use the model's own Qwen2 tokenizer")
    if tokenizer.vocab_size > config.vocab_size:
        raise TokenizerError(f"the tokenizer has {tokenizer.vocab_size} tokens but the embedding only "
                             f"{config.vocab_size} rows; they do not belong to the same model")
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(config.vocab_size):  # llama.cpp wants one token per embedding row
        token = added[i]["content"] if i in added else by_id.get(i, f"[PAD{i}]")
        tokens.append(token)
        if i in added:
            types.append(TokenType.CONTROL if added[i]["special"] else TokenType.USER_DEFINED)
        else:
            types.append(TokenType.UNUSED if token == f"[PAD{i}]" else TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])

    def special(token: str | None, fallback: int | None) -> int | None:
        i = tokenizer.token_to_id(token) if token is not None else None
        return i if i is not None else fallback

    # The tokenizer's own special tokens first, as llama.cpp's converter does (an instruct model's
    # tokenizer ends turns with <|im_end|> even where config.json names <|endoftext|>).
    eos = special(tokenizer.eos_token, (config.eos_token_ids or [None])[0])
    bos = special(tokenizer.bos_token, config.bos_token_id)
    pad = special(tokenizer.pad_token, config.pad_token_id)
    for add, i in ((w.add_eos_token_id, eos), (w.add_bos_token_id, bos), (w.add_pad_token_id, pad)):
        if i is not None:
            add(i)
    w.add_add_bos_token(False)  # Qwen2 prompts start without a BOS token
    if tokenizer.chat_template is not None:
        w.add_chat_template(tokenizer.chat_template)


# -- writing -----------------------------------------------------------------------------
def export_gguf(config: Qwen2Config, state_dict: dict[str, torch.Tensor], tokenizer: Tokenizer,
                path: str | Path, type: str = "f16", name: str = "qwen2") -> Counter[str]:
    """Write the model as one GGUF file; returns how many tensors went into each GGML type.

    The file appears only once complete (written beside it, flushed, then renamed), so a failure
    or a crash leaves no half-written file and any earlier file at `path` as it was."""
    path = check_target(path, type)
    check_representable(config)
    w = gguf.GGUFWriter(None, "qwen2moe" if config.is_moe else "qwen2")
    w.add_name(name)
    w.add_file_type(_FILE_TYPES[type])
    if type in ("q8_0", "q4_k"):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_config(w, config)
    _add_tokenizer(w, tokenizer, config)
    counts: Counter[str] = Counter()
    tensors = list(_gguf_tensors(config, state_dict))
    for gguf_name, t in tqdm(tensors, desc=f"writing {type}", unit="tensor", leave=False, disable=None):
        qtype = storage_type(gguf_name, tuple(t.shape), type)
        w.add_tensor(gguf_name, encode(gguf_name, t, qtype), raw_dtype=qtype)
        counts[qtype.name] += 1

    def write(tmp: Path) -> None:
        try:
            w.write_header_to_file(tmp)
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()

    write_atomically(path, write)
    return counts
