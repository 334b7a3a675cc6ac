"""Load an HF checkpoint folder: config.json plus model.safetensors or sharded safetensors.

Our state dict naming is the hub naming, so loading is reading. Tensors come from
`safetensors.safe_open` (memory-mapped; nothing is cloned, only cast when asked).
PyTorch `.bin` pickles are not read: they can run code on load.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from qwen2.config import Qwen2Config
from qwen2.errors import WeightsError
from qwen2.weights import Select, select_from

INDEX = "model.safetensors.index.json"
# transformers 5.x keeps MoE experts fused in memory; accept those names if a file has them.
_FUSED = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)")


def state_dict_keys(config: Qwen2Config) -> list[str]:
    """Every tensor name a model of this config has (HF hub naming)."""
    keys = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config.tie_word_embeddings:
        keys.append("lm_head.weight")
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        keys += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight",
                 p + "self_attn.o_proj.weight"]
        for x in "qkv":
            keys.append(f"{p}self_attn.{x}_proj.weight")
            if config.qkv_bias:
                keys.append(f"{p}self_attn.{x}_proj.bias")
        mlps = [p + "mlp."]
        if config.layer_is_sparse(i):
            keys.append(p + "mlp.gate.weight")
            mlps = [f"{p}mlp.experts.{e}." for e in range(config.num_experts)]
            if config.shared_expert_intermediate_size:
                keys.append(p + "mlp.shared_expert_gate.weight")
                mlps.append(p + "mlp.shared_expert.")
        keys += [f"{m}{w}_proj.weight" for m in mlps for w in ("gate", "up", "down")]
    return keys


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise WeightsError(f"{index} is not a valid safetensors index ({e}); re-download it") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise WeightsError(f"{folder} lacks shard(s) listed in {INDEX}: {', '.join(missing)}; the "
                               "download is incomplete, fetch the missing files")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    if any(folder.glob("*.bin")):
        raise WeightsError(
            f"{folder} holds only PyTorch .bin weights, which are not supported (loading them can run "
            "code). Convert them to safetensors once with transformers: "
            "AutoModelForCausalLM.from_pretrained(FOLDER).save_pretrained(OUT)"
        )
    raise WeightsError(f"no *.safetensors weights in {folder}; an HF checkpoint folder needs "
                       "config.json and model.safetensors (or shards with an index)")


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


def _read(f, name: str, select: Select | None) -> torch.Tensor | None:
    """One tensor, or the part of it `select` asks for (only those bytes are read), or None."""
    if select is None:
        return f.get_tensor(name)
    view = f.get_slice(name)
    part = select(name, tuple(view.get_shape()))
    if part is True or part is False:
        return view[:] if part else None
    dim, start, stop = part
    return view[start:stop] if dim == 0 else view[:, start:stop]


def _split_fused(name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """[E, 2I, H] gate_up_proj / [E, H, I] down_proj -> one tensor per expert."""
    prefix, kind = _FUSED.fullmatch(name).groups()
    out = {}
    for e, w in enumerate(t):
        if kind == "down_proj":
            out[f"{prefix}.{e}.down_proj.weight"] = w.clone()
        else:
            gate, up = w.chunk(2, dim=0)
            out[f"{prefix}.{e}.gate_proj.weight"] = gate.clone()
            out[f"{prefix}.{e}.up_proj.weight"] = up.clone()
    return out


def load_hf(folder: str | Path, dtype: torch.dtype | None = None, select: Select | None = None
            ) -> tuple[Qwen2Config, dict[str, torch.Tensor]]:
    """Load (config, state dict) from an HF checkpoint folder; dtype=None keeps the stored one.
    `select` (qwen2.weights.Select) reads only the chosen tensors, and of a part only its bytes."""
    folder = Path(folder)
    config = Qwen2Config.from_hf_json(folder)
    state: dict[str, torch.Tensor] = {}
    for file in safetensors_files(folder):
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    if _FUSED.fullmatch(name):  # transformers 5's fused experts: one tensor per expert
                        parts = _split_fused(name, f.get_tensor(name))
                        parts = select_from(parts, select) if select else parts
                    else:
                        parts = {name: _read(f, name, select)}
                    state |= {k: _cast(t, dtype) for k, t in parts.items() if t is not None}
        except (SafetensorError, OSError) as e:
            raise WeightsError(f"{file} is not a readable safetensors file ({e}); re-download it") from None
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing = [k for k in state_dict_keys(config) if k not in state]
    if missing and select is None:
        raise WeightsError(f"{folder} lacks {len(missing)} tensor(s) its config.json implies, e.g. "
                           f"{', '.join(missing[:3])}; the checkpoint is incomplete or mislabelled")
    return config, state
