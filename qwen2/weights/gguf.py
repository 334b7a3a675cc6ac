"""Read a GGUF file (llama.cpp's format) into a Qwen2Config and a state dict in HF naming.

Covers the `qwen2` and `qwen2moe` architectures in little-endian GGUF v2/v3 single files
(split files must be merged first), and every tensor type gguf-py can dequantize (F32, F16,
BF16, Q4_0..Q8_0, the K-quants, the IQ types); not Q8_1, Q8_K or integer tensors.

Dequantization is gguf-py's own per-type code, so values are bit-identical to what
transformers loads; we call it on large slices from a thread pool, not row group by row
group. We parse the header ourselves: `gguf.GGUFReader` walks the 300k tokenizer strings
one numpy view at a time and takes ~12 s on the default model, this parser ~0.3 s.
llama.cpp keeps qwen2's rotate-half q/k layout, so nothing is permuted.
"""

from __future__ import annotations

import math
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf.quants
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from tqdm import tqdm

from qwen2.config import Qwen2Config
from qwen2.errors import ConfigError, WeightsError
from qwen2.weights import Select
from qwen2.weights.hf import state_dict_keys

Q = GGMLQuantizationType
_SCALARS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
# Arrays of arrays: llama.cpp writes none, so a few levels are already generous. The bound keeps a
# file of arrays nested thousands deep (12 bytes a level) from ending in Python's RecursionError.
MAX_ARRAY_DEPTH = 8

# GGUF tensor name -> ours. Per layer: blk.{i}.<key> -> model.layers.{i}.<value>.
GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
}
for _p in "qkv":
    for _kind in ("weight", "bias"):
        LAYER_TENSORS[f"attn_{_p}.{_kind}"] = f"self_attn.{_p}_proj.{_kind}"
for _w in ("gate", "up", "down"):
    LAYER_TENSORS[f"ffn_{_w}.weight"] = f"mlp.{_w}_proj.weight"
    LAYER_TENSORS[f"ffn_{_w}_shexp.weight"] = f"mlp.shared_expert.{_w}_proj.weight"
    # Stacked [E, out, in]: split into one tensor per expert.
    LAYER_TENSORS[f"ffn_{_w}_exps.weight"] = f"mlp.experts.{{e}}.{_w}_proj.weight"


@dataclass
class Blocks:
    """A matrix as the file stores it: each row a run of quantized blocks, not decoded.

    `data` is uint8 [rows, bytes per row], a view of the memory-mapped file (no copy);
    `shape` is the decoded matrix's (rows, columns); `qtype` the GGML type id.
    """

    qtype: int
    data: torch.Tensor
    shape: tuple[int, int]


@dataclass
class _TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (GGUF lists dims innermost first)
    qtype: int
    offset: int  # absolute byte offset in the file


# -- header ------------------------------------------------------------------------------
class _Header:
    """Parses the GGUF header (key/values, tensor infos) out of a byte buffer."""

    def __init__(self, buf: memoryview) -> None:
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: struct.Struct) -> Any:
        (v,) = fmt.unpack_from(self.buf, self.pos)
        self.pos += fmt.size
        return v

    def string(self) -> str:
        n = self.unpack(_U64)
        if self.pos + n > len(self.buf):
            raise ValueError("string runs past the end of the file")
        s = str(self.buf[self.pos : self.pos + n], "utf-8")
        self.pos += n
        return s

    def value(self, vtype: int, depth: int = 0) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            if depth == MAX_ARRAY_DEPTH:
                raise ValueError(f"arrays nested more than {MAX_ARRAY_DEPTH} deep")
            itype, n = self.unpack(_U32), self.unpack(_U64)
            if itype in _SCALARS:  # numeric arrays (token types, scores) in one go
                arr = np.frombuffer(self.buf, np.dtype(_SCALARS[itype]), count=n, offset=self.pos)
                self.pos += arr.nbytes
                return arr.tolist()
            return [self.value(itype, depth + 1) for _ in range(n)]
        return self.unpack(struct.Struct(_SCALARS[GGUFValueType(vtype)]))

    def parse(self) -> tuple[dict[str, Any], list[_TensorInfo]]:
        self.pos = 8  # magic and version were checked by the caller
        n_tensors, n_kv = self.unpack(_U64), self.unpack(_U64)
        meta = {}
        for _ in range(n_kv):
            key = self.string()
            meta[key] = self.value(self.unpack(_U32))
        infos = []
        for _ in range(n_tensors):
            name = self.string()
            dims = [self.unpack(_U64) for _ in range(self.unpack(_U32))]
            qtype, offset = self.unpack(_U32), self.unpack(_U64)
            infos.append(_TensorInfo(name, tuple(reversed(dims)), qtype, offset))
        align = meta.get("general.alignment", 32)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise ValueError(f"general.alignment {align!r} is not a power of two")
        start = -(-self.pos // align) * align
        for info in infos:
            info.offset += start
        return meta, infos


def _open(path: str | Path) -> tuple[np.memmap, dict[str, Any], list[_TensorInfo]]:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"no GGUF file at {path}")
    with path.open("rb") as f:
        head = f.read(8)
    if head[:4] != b"GGUF":
        raise WeightsError(f"{path} is not a GGUF file (it does not start with 'GGUF'); pass a .gguf file "
                           "or an HF checkpoint folder")
    version = int.from_bytes(head[4:8], "little")
    if version not in (2, 3):
        raise WeightsError(f"{path} is GGUF version {version}; only little-endian v2/v3 files are "
                           "supported: re-convert it with a recent llama.cpp")
    # Copy-on-write: torch wants writable buffers, and we never write, so no page is copied.
    data = np.memmap(path, dtype=np.uint8, mode="c")
    try:
        meta, infos = _Header(memoryview(data)).parse()
    except (struct.error, ValueError, IndexError, KeyError, UnicodeDecodeError, OverflowError) as e:
        raise WeightsError(f"{path}: the GGUF header is truncated or corrupt ({e}); re-download the file") from None
    if meta.get("split.count", 1) not in (0, 1):
        raise WeightsError(f"{path} is one part of a split GGUF; merge the parts first with "
                           "`llama-gguf-split --merge`")
    return data, meta, infos


def _add_derived(meta: dict[str, Any], infos: list[_TensorInfo]) -> dict[str, Any]:
    shapes = {t.name: t.shape for t in infos}
    if "token_embd.weight" in shapes:
        meta["vocab_size"] = shapes["token_embd.weight"][0]
    meta["tie_word_embeddings"] = "output.weight" not in shapes
    return meta


def config_from_gguf(meta: dict[str, Any]) -> Qwen2Config:
    """A config from GGUF key/values (`general.architecture` and the `<arch>.*` keys)."""
    arch = meta.get("general.architecture")
    if arch not in ("qwen2", "qwen2moe"):
        raise ConfigError(
            f"GGUF architecture {arch!r} is not supported: this package runs qwen2 and "
            "qwen2moe GGUF files only"
        )

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    n_heads = get("attention.head_count")
    d: dict[str, Any] = {
        "model_type": "qwen2_moe" if arch == "qwen2moe" else "qwen2",
        "hidden_size": get("embedding_length"),
        "intermediate_size": get("feed_forward_length", 0),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": get("attention.head_count_kv", n_heads),
        "max_position_embeddings": get("context_length", 32768),
        "rope_theta": get("rope.freq_base", 1_000_000.0),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-6),
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "vocab_size": meta.get("vocab_size"),
    }
    if get("rope.scaling.type") == "yarn":
        d["rope_scaling"] = {
            "rope_type": "yarn",
            "factor": get("rope.scaling.factor"),
            "original_max_position_embeddings": get("rope.scaling.original_context_length"),
        }
    if arch == "qwen2moe":
        d |= {
            "num_experts": get("expert_count"),
            "num_experts_per_tok": get("expert_used_count"),
            "moe_intermediate_size": get("expert_feed_forward_length"),
            "shared_expert_intermediate_size": get("expert_shared_feed_forward_length"),
        }
    missing = [k for k, v in d.items() if v is None and k not in ("pad_token_id", "bos_token_id", "eos_token_id")]
    if missing:
        raise ConfigError(f"GGUF metadata lacks {', '.join(missing)}; the file is incomplete")
    if "tie_word_embeddings" in meta:
        d["tie_word_embeddings"] = meta["tie_word_embeddings"]
    return Qwen2Config.from_dict(d)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """All GGUF key/values as plain Python values, plus `vocab_size` (rows of the
    embedding) and `tie_word_embeddings` (no separate output.weight)."""
    _, meta, infos = _open(path)
    return _add_derived(meta, infos)


# -- dequantization ----------------------------------------------------------------------
_PLAIN = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
# gguf.quants.dequantize works in groups of 16 rows, several times slower than calling its
# per-type block code on large slices; 2M weights keep one slice's temporaries near 50 MB.
_CHUNK_WEIGHTS = 1 << 21


def _quant_class(qtype: GGMLQuantizationType) -> Any:
    """gguf-py's dequantizer for a type (a class named like the type), or None."""
    cls = getattr(gguf.quants, qtype.name, None)
    return cls if isinstance(cls, type) else None


def _jobs(out: torch.Tensor, raw: np.ndarray, qtype: GGMLQuantizationType) -> list[tuple]:
    """Split filling `out` from the raw bytes `raw` into independent slices."""
    if qtype in _PLAIN:
        return [(out.view(-1), raw, qtype)]
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    blocks, flat = raw.reshape(-1, type_size), out.view(-1, block_size)
    step = max(1, _CHUNK_WEIGHTS // block_size)
    return [(flat[i : i + step], blocks[i : i + step], qtype) for i in range(0, len(blocks), step)]


def _run(job: tuple) -> int:
    dest, raw, qtype = job
    if qtype in _PLAIN:
        dest.copy_(torch.from_numpy(raw).view(_PLAIN[qtype]))
    else:
        dest.copy_(torch.from_numpy(_quant_class(qtype).dequantize_rows(raw)))
    return raw.nbytes


def dequantize(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...],
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Raw GGUF bytes (1-D uint8) of one tensor -> a new tensor of `shape` (torch order)."""
    out = torch.empty(shape, dtype=dtype)
    for job in _jobs(out, raw, qtype):
        _run(job)
    return out


# -- loading -----------------------------------------------------------------------------
def _our_name(name: str) -> str | None:
    if name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[name]
    blk, _, rest = name.partition(".")
    if blk == "blk" and "." in rest:
        i, _, key = rest.partition(".")
        if i.isdigit() and key in LAYER_TENSORS:
            return f"model.layers.{i}.{LAYER_TENSORS[key]}"
    return None


def _check(info: _TensorInfo, path: Path, file_size: int) -> tuple[GGMLQuantizationType, int]:
    """A tensor's type and byte size, or a WeightsError saying why we cannot read it."""
    try:
        qtype = GGMLQuantizationType(info.qtype)
    except ValueError:
        raise WeightsError(f"{path}: tensor {info.name} has unknown type id {info.qtype}; the file is "
                           "corrupt or newer than this gguf package (pip install -U gguf)") from None
    if qtype not in _PLAIN and _quant_class(qtype) is None:
        raise WeightsError(f"{path}: tensor {info.name} is stored as {qtype.name}, which cannot be "
                           "dequantized; use a GGUF quantized as F16, Q8_0, Q4_K_M or similar")
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if info.shape and info.shape[-1] % block_size:
        raise WeightsError(f"{path}: tensor {info.name} rows ({info.shape[-1]}) are not a multiple of the "
                           f"{qtype.name} block size; the file is corrupt")
    n_bytes = math.prod(info.shape) // block_size * type_size
    if info.offset + n_bytes > file_size:
        raise WeightsError(f"{path}: tensor {info.name} lies past the end of the file; the file is "
                           "truncated, re-download it")
    return qtype, n_bytes


def _keepable(name: str) -> bool:
    """Weights of linear layers and the embedding; MoE routers stay float (they pick experts)."""
    return name.endswith(("_proj.weight", "embed_tokens.weight", "lm_head.weight"))


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32, keep: frozenset[int] = frozenset(),
              select: Select | None = None,
              ) -> tuple[Qwen2Config, dict[str, torch.Tensor | Blocks], dict[str, Any]]:
    """Load a qwen2 / qwen2moe GGUF: (config, state dict in HF naming, metadata).

    Matrices of a linear layer or the embedding whose GGML type is in `keep` are returned as
    `Blocks` mapped from the file, not decoded; everything else is dequantized to `dtype`.
    `select` (qwen2.weights.Select) reads only the chosen tensors; a part made of whole rows reads
    only their blocks (a row's blocks are contiguous), a part of columns cuts through every row's
    blocks, so that tensor is dequantized whole, then sliced.
    """
    path = Path(path)
    data, meta, infos = _open(path)
    config = config_from_gguf(_add_derived(meta, infos))
    state: dict[str, torch.Tensor] = {}
    jobs = []
    for info in infos:
        name = _our_name(info.name)
        if name is None:
            raise WeightsError(f"{path}: unexpected tensor {info.name!r} for a {config.model_type} model; "
                               "is this really a Qwen2 GGUF?")
        qtype, n_bytes = _check(info, path, len(data))
        raw = data[info.offset : info.offset + n_bytes]
        if "{e}" in name:  # stacked experts are outermost, so each one's bytes are contiguous
            parts = [(name.format(e=e), r, info.shape[1:]) for e, r in enumerate(raw.reshape(info.shape[0], -1))]
        elif name.endswith("shared_expert_gate.weight"):
            parts = [(name, raw, (1, info.shape[-1]))]  # a [1, H] Linear that GGUF stores as a vector
        else:
            parts = [(name, raw, info.shape)]
        for key, r, shape in parts:
            part = select(key, tuple(shape)) if select else True
            if part is False:
                continue
            if part is not True and part[0] == 0:  # whole rows: read only their blocks
                _, start, stop = part
                r, shape = r.reshape(shape[0], -1)[start:stop].reshape(-1), (stop - start, *shape[1:])
            elif part is not True:  # columns: the whole tensor, now, then its slice
                _, start, stop = part
                state[key] = dequantize(r.reshape(-1), qtype, shape, dtype).narrow(1, start, stop - start).clone()
                continue
            if qtype in keep and len(shape) == 2 and _keepable(key):
                state[key] = Blocks(int(qtype), torch.from_numpy(r.reshape(shape[0], -1)), tuple(shape))
                continue
            state[key] = torch.empty(shape, dtype=dtype)
            jobs += _jobs(state[key], r.reshape(-1), qtype)

    missing = [k for k in state_dict_keys(config) if k not in state]
    if missing and select is None:
        raise WeightsError(f"{path} lacks {len(missing)} tensor(s) a {config.model_type} model needs, e.g. "
                           f"{', '.join(missing[:3])}; the file is incomplete or not a Qwen2 GGUF")
    # numpy releases the GIL inside its array operations, so threads scale with cores.
    total = sum(job[1].nbytes for job in jobs)
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool, tqdm(
        total=total, unit="B", unit_scale=True, desc="dequantizing", leave=False, disable=None
    ) as bar:
        for n in pool.map(_run, jobs):
            bar.update(n)
    return config, state, meta
