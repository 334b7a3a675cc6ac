"""Describe a checkpoint without loading its tensors: config and bytes on disk."""

from __future__ import annotations

from pathlib import Path

from qwen2.config import Qwen2Config


def describe(spec: str | None) -> tuple[Qwen2Config, int, str]:
    from qwen2.weights.default import default_model_path
    from qwen2.weights.gguf import read_metadata
    from qwen2.weights.hub import resolve_hub

    path = default_model_path() if spec is None else Path(spec)
    if spec is not None and not path.exists():
        path = resolve_hub(spec)
    if path.is_file():
        return Qwen2Config.from_gguf_metadata(read_metadata(path)), path.stat().st_size, str(path)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return Qwen2Config.from_hf_json(path), size, str(path)
