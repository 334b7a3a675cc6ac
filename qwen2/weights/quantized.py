"""Quantized models kept on disk, so the second start of an int8/int4 model maps its weights
instead of dequantizing the checkpoint and quantizing every matrix again.

That second path is what makes a quantized start fast and small: no float copy of the weights
ever exists (the float model alone is 2.4x the int8 one), and the tensors are memory-mapped
from the page cache rather than computed. This module reads and writes the files; qwen2.loading
builds the network from them.

An entry is a folder under <cache>/quantized/: config.json, the tokenizer files, and
model.safetensors with the quantized model's whole state dict (int8 or packed int4 weights,
scales, the float embedding, norms, biases) and its settings as metadata. Its name hashes
everything the tensors depend on: the source's path, sizes and modification times, and the
settings (mode, group size, dtype, torch version, the int4 packing this CPU uses). An entry is
written to a temporary folder, flushed to the disk and renamed into place (qwen2.files), so an
interrupted run or a crash leaves no half entry; one that fails to load is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from qwen2.config import Qwen2Config
from qwen2.errors import Qwen2Error
from qwen2.files import write_folder_atomically
from qwen2.pypi import cache_dir
from qwen2.tokenizer import Tokenizer

log = logging.getLogger(__name__)

FORMAT = 2  # bump when what an entry holds changes
ALIGN = 64  # bytes; tensors whose sizes are multiples of it stay aligned in the file


def _aligned(t: torch.Tensor) -> torch.Tensor:
    # the int8 kernel's multi-row path faults on weights that are not 64-byte aligned
    return t if t.data_ptr() % ALIGN == 0 else t.clone()


def _fingerprint(source: Path) -> list:
    files = sorted(p for p in source.iterdir() if p.is_file()) if source.is_dir() else [source]
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def entry_for(source: Path, settings: dict) -> Path:
    """The cache folder for `source` quantized with `settings` (it may not exist yet)."""
    key = json.dumps([FORMAT, str(source.resolve()), _fingerprint(source), settings], sort_keys=True, default=str)
    mode = settings.get("mode", "q")
    return cache_dir() / "quantized" / f"{source.stem}-{mode}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def read_entry(entry: Path) -> tuple[Qwen2Config, Tokenizer, dict[str, torch.Tensor], dict[str, str]] | None:
    """(config, tokenizer, state dict mapped from the file, settings), or None when the entry
    is missing or unreadable."""
    weights = entry / "model.safetensors"
    if not weights.exists():
        return None
    try:
        config = Qwen2Config.from_hf_json(entry / "config.json")
        tokenizer = Tokenizer.from_files(entry)
        with safe_open(weights, framework="pt") as f:
            settings = f.metadata() or {}
            state = {k: _aligned(f.get_tensor(k)) for k in f.keys()}  # views of the mapped file
    except (OSError, SafetensorError, Qwen2Error, ValueError) as e:
        log.warning("ignoring the quantized cache %s (%s); rebuilding it", entry, e)
        return None
    return config, tokenizer, state, settings


def write_entry(entry: Path, config: Qwen2Config, tokenizer: Tokenizer, state_dict: dict[str, torch.Tensor],
                settings: dict) -> None:
    """Write the entry (replacing one that failed to load); a failure (disk full, read-only cache)
    is logged, never raised."""
    metadata = {k: str(v) for k, v in settings.items()}

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
        tokenizer.save(tmp)
        tensors = {k: v.contiguous() for k, v in state_dict.items()}
        save_file(tensors, tmp / "model.safetensors", metadata=metadata | {"pad": ""})
        with (tmp / "model.safetensors").open("rb") as f:
            header = 8 + int.from_bytes(f.read(8), "little")
        if header % ALIGN:  # a longer header shifts every tensor by the same number of bytes
            pad = " " * (-header % ALIGN)
            save_file(tensors, tmp / "model.safetensors", metadata=metadata | {"pad": pad})

    try:
        write_folder_atomically(entry, write)
    except OSError as e:
        log.warning("could not cache the quantized model in %s (%s); the next start quantizes again", entry, e)
