"""Official GPTQ-Int4 and AWQ checkpoints (e.g. Qwen/Qwen2-7B-Instruct-GPTQ-Int4, -AWQ): an HF folder
whose config.json has a `quantization_config`, and whose Linear layers are stored as packed 4-bit
integers. This module reads and unpacks them (qwen2.quant.prequantized builds the int4 network from them)
and dequantizes them to float for every other consumer (`load_int4_folder`).

Per Linear W [out=N, in=K], with inputs in groups sharing a scale s and a zero z: w = (q - z) * s.
- GPTQ (AutoGPTQ): `qweight` int32 [K/8, N], eight q packed along the inputs, lowest nibble first;
  `qzeros` int32 [G, N/8], packed the same way along the outputs; `scales` [G, N]; `g_idx` int32 [K],
  each input's group (unsorted when desc_act quantized the inputs in another order). The "gptq" (v1)
  format stores z - 1, so a stored nibble reads back as z = nibble + 1 (1..16, as every v1 loader
  reads it); "gptq_v2" stores z.
- AWQ GEMM (AutoAWQ): `qweight` int32 [K, N/8] and `qzeros` [G, N/8], both packed along the outputs
  with the eight columns of a word in nibble order 0, 2, 4, 6, 1, 3, 5, 7; `scales` [G, N]; groups in
  input order.
Norms, embeddings, lm_head and biases are plain float16 tensors. Tensors are read one Linear at a
time from the memory-mapped safetensors.

Not covered: 2/3/8-bit GPTQ, AWQ without zero points or in its GEMV / Marlin / exllama layouts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from qwen2.config import Qwen2Config
from qwen2.errors import WeightsError
from qwen2.weights.hf import safetensors_files, state_dict_keys

SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)  # nibble i of an int32 word sits at bit 4i
AWQ_NIBBLE_OF_COLUMN = [0, 4, 1, 5, 2, 6, 3, 7]  # inverse of AWQ's packing order 0, 2, 4, 6, 1, 3, 5, 7


@dataclass(frozen=True)
class Int4Format:
    """What config.json's quantization_config says about the packed tensors."""
    method: str  # "gptq" or "awq"
    group_size: int  # inputs per scale; -1: one group spans all inputs
    zero_offset: int  # added to each stored zero (GPTQ v1 stores z - 1)


@dataclass
class UnpackedLinear:
    """One Linear's integers and scales, unpacked: W[n, k] = (q[n, k] - zeros[g, n]) * scales[g, n], g = g_idx[k]."""
    q: Tensor  # uint8 [N, K], 0..15
    zeros: Tensor  # int32 [G, N]
    scales: Tensor  # float32 [G, N]
    g_idx: Tensor  # int64 [K]


def int4_format(quantization: dict) -> Int4Format:
    """Check a quantization_config and say how to read its tensors; anything else is a WeightsError."""
    method = str(quantization.get("quant_method", "")).lower()
    bits = quantization.get("bits", quantization.get("w_bit"))
    group_size = quantization.get("group_size", quantization.get("q_group_size"))
    where = f"config.json's quantization_config ({method or 'no quant_method'})"
    if method not in ("gptq", "awq"):
        raise WeightsError(f"{where}: only GPTQ and AWQ 4-bit checkpoints are supported; use the float "
                           "(bf16) checkpoint or a GGUF file")
    if bits != 4:
        raise WeightsError(f"{where} has bits={bits!r}; only 4-bit {method.upper()} is supported: use a 4-bit "
                           "checkpoint (e.g. Qwen2-7B-Instruct-GPTQ-Int4), the float one or a GGUF file")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or not (group_size == -1 or group_size > 0):
        raise WeightsError(f"{where} has group_size={group_size!r}; expected a positive number of inputs or -1")
    if method == "awq":
        version = str(quantization.get("version", "gemm")).lower()
        if version != "gemm" or quantization.get("zero_point", True) is not True:
            raise WeightsError(f"{where} has version={version!r}, zero_point={quantization.get('zero_point')!r}; "
                               "only AWQ GEMM with zero points (as AutoAWQ writes by default) is supported")
        return Int4Format("awq", group_size, 0)
    layout = str(quantization.get("checkpoint_format", "gptq")).lower()
    if layout not in ("gptq", "gptq_v2"):
        raise WeightsError(f"{where} has checkpoint_format={layout!r}; only gptq and gptq_v2 are supported")
    return Int4Format("gptq", group_size, 1 if layout == "gptq" else 0)


def read_config(folder: str | Path) -> tuple[Qwen2Config, Int4Format | None]:
    """A folder's config and its int4 format (None for a float checkpoint)."""
    path = Path(folder) / "config.json"
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return Qwen2Config.from_hf_json(folder), None  # which says what is wrong with the file
    quantization = d.pop("quantization_config", None) if isinstance(d, dict) else None
    if not isinstance(quantization, dict):
        return Qwen2Config.from_hf_json(folder), None
    return Qwen2Config.from_dict(d), int4_format(quantization)


def is_int4_checkpoint(path: str | Path) -> bool:
    """Whether `path` is an HF folder whose config.json names a quantization_config."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        d = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(d, dict) and isinstance(d.get("quantization_config"), dict)


def _unpack(words: Tensor) -> Tensor:
    """int32 [R, C] -> uint8 [R, 8C]: nibble i of word c becomes column 8c + i."""
    return ((words[..., None] >> SHIFTS) & 0xF).to(torch.uint8).reshape(words.shape[0], -1)


def _awq_order(q: Tensor) -> Tensor:
    """Undo AWQ's interleave along the last dim: [R, 8C] in nibble order -> [R, 8C] in column order."""
    rows, cols = q.shape
    return q.view(rows, cols // 8, 8)[..., AWQ_NIBBLE_OF_COLUMN].reshape(rows, cols)


def unpack_gptq(qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor, zero_offset: int) -> UnpackedLinear:
    """GPTQ tensors (shapes checked by the caller) -> integers."""
    return UnpackedLinear(_unpack(qweight.T.contiguous()), _unpack(qzeros).to(torch.int32) + zero_offset,
                          scales.float(), g_idx.long())


def unpack_awq(qweight: Tensor, qzeros: Tensor, scales: Tensor, group_size: int) -> UnpackedLinear:
    """AWQ GEMM tensors (shapes checked by the caller) -> integers; groups follow the input order."""
    q = _awq_order(_unpack(qweight)).T.contiguous()
    k = q.shape[1]
    return UnpackedLinear(q, _awq_order(_unpack(qzeros)).to(torch.int32), scales.float(),
                          torch.arange(k) // (k if group_size == -1 else group_size))


def dequantize(layer: UnpackedLinear, dtype: torch.dtype = torch.float32) -> Tensor:
    """W [N, K] = (q - z) * s, computed in float32 (exact up to float32 rounding of the product)."""
    zeros, scales = layer.zeros[layer.g_idx].T, layer.scales[layer.g_idx].T  # (N, K) each
    return ((layer.q.float() - zeros) * scales).to(dtype)


@contextmanager
def open_tensors(folder: Path) -> Iterator[dict]:
    """name -> the open safetensors file holding it, across shards (memory-mapped, read on demand)."""
    with ExitStack() as stack:
        where = {}
        for file in safetensors_files(folder):
            try:
                f = stack.enter_context(safe_open(file, framework="pt"))
            except (SafetensorError, OSError) as e:
                raise WeightsError(f"{file} is not a readable safetensors file ({e}); re-download it") from None
            where |= dict.fromkeys(f.keys(), f)
        yield where


def get_tensor(tensors: dict, name: str, what: str) -> Tensor:
    if name not in tensors:
        raise WeightsError(f"the checkpoint lacks {name} ({what}); the download is incomplete or the "
                           "file was written by another tool")
    try:
        return tensors[name].get_tensor(name)
    except SafetensorError as e:
        raise WeightsError(f"cannot read {name} ({e}); re-download the checkpoint") from None


def _expect(name: str, t: Tensor, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...], why: str) -> None:
    if tuple(t.shape) != shape or t.dtype not in dtypes:
        raise WeightsError(f"{name} is {t.dtype} {tuple(t.shape)}, expected {dtypes[0]} {shape} ({why}); "
                           "the checkpoint does not match its config.json")


def read_linear(tensors: dict, prefix: str, fmt: Int4Format, n: int | None = None, k: int | None = None
                ) -> UnpackedLinear:
    """Read and unpack the Linear `prefix` (out n, in k: by default what qweight implies), checking
    every tensor's shape and dtype."""
    what = f"{fmt.method.upper()} stores qweight, qzeros and scales per Linear"
    qweight = get_tensor(tensors, f"{prefix}.qweight", what)
    if n is None or k is None:
        if qweight.dim() != 2 or not qweight.numel():
            raise WeightsError(f"{prefix}.qweight is {tuple(qweight.shape)}; expected a 2-D packed matrix")
        rows, cols = qweight.shape
        n, k = (cols, rows * 8) if fmt.method == "gptq" else (cols * 8, rows)
        why = f"a {n}x{k} Linear as {prefix}.qweight {tuple(qweight.shape)} implies, group_size {fmt.group_size}"
    else:
        why = f"a {n}x{k} Linear with group_size {fmt.group_size}"
    size = k if fmt.group_size == -1 else fmt.group_size
    groups = -(-k // size)
    if n % 8 or (fmt.method == "gptq" and k % 8):
        raise WeightsError(f"{prefix} is {n}x{k}: 4-bit packing needs multiples of 8; the checkpoint does not "
                           "match its config.json")
    floats = (torch.float16, torch.bfloat16, torch.float32)
    packed = (k // 8, n) if fmt.method == "gptq" else (k, n // 8)
    _expect(f"{prefix}.qweight", qweight, packed, (torch.int32,), why)
    qzeros = get_tensor(tensors, f"{prefix}.qzeros", what)
    _expect(f"{prefix}.qzeros", qzeros, (groups, n // 8), (torch.int32,), why)
    scales = get_tensor(tensors, f"{prefix}.scales", what)
    _expect(f"{prefix}.scales", scales, (groups, n), floats, why)
    if fmt.method == "awq":
        return unpack_awq(qweight, qzeros, scales, fmt.group_size)
    if f"{prefix}.g_idx" in tensors:
        g_idx = get_tensor(tensors, f"{prefix}.g_idx", what)
        _expect(f"{prefix}.g_idx", g_idx, (k,), (torch.int32, torch.int64), why)
        if g_idx.numel() and (g_idx.min() < 0 or g_idx.max() >= groups):
            raise WeightsError(f"{prefix}.g_idx names groups outside 0..{groups - 1}; the checkpoint is corrupt")
    else:
        g_idx = torch.arange(k) // size
    return unpack_gptq(qweight, qzeros, scales, g_idx, fmt.zero_offset)


def packed_prefixes(config: Qwen2Config, tensors: dict) -> list[str]:
    """Every Linear the config implies that the checkpoint stores packed."""
    prefixes = [key.removesuffix(".weight") for key in state_dict_keys(config) if key.endswith(".weight")]
    return [p for p in prefixes if f"{p}.qweight" in tensors]


def load_int4_folder(folder: str | Path, dtype: torch.dtype | None = None, keep_packed: bool = False
                     ) -> tuple[Qwen2Config, dict[str, Tensor | UnpackedLinear]]:
    """(config, state dict in hub naming): every packed Linear's weight as its own integers
    (`UnpackedLinear`, keep_packed) or dequantized to float, one at a time; the rest float. Shapes
    are checked against the config when the network adopts the tensors."""
    folder = Path(folder)
    config, fmt = read_config(folder)
    state: dict[str, Tensor] = {}
    with open_tensors(folder) as tensors:
        packed = set(packed_prefixes(config, tensors))
        if not packed:
            raise no_packed_layers(folder, fmt)
        for key in state_dict_keys(config):
            prefix = key.removesuffix(".weight")
            if prefix in packed:
                layer = read_linear(tensors, prefix, fmt)
                state[key] = layer if keep_packed else dequantize(layer, dtype or torch.float16)
            else:
                t = get_tensor(tensors, key, "a float tensor")
                state[key] = t if dtype is None else t.to(dtype)
    return config, state


def no_packed_layers(folder: Path, fmt: Int4Format) -> WeightsError:
    return WeightsError(f"{folder}: config.json names a {fmt.method.upper()} quantization_config but no Linear "
                        "layer is stored packed (no *.qweight tensor, e.g. model.layers.0.self_attn.q_proj.qweight); "
                        "remove quantization_config from a float checkpoint, or re-download the quantized one")
