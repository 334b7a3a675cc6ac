"""Quantized models kept on disk, so the second start of an int8/int4 model maps its weights
instead of dequantizing the checkpoint and quantizing every matrix again.

That second path is what makes a quantized start fast and small: no float copy of the weights
ever exists (the float model alone is 2.4x the int8 one), and the tensors are memory-mapped
from the page cache rather than computed.

An entry is a folder under <cache>/quantized/: config.json, the tokenizer files, and
model.safetensors with the quantized model's whole state dict (int8 or packed int4 weights,
scales, the float embedding, norms, biases). Its name hashes everything the tensors depend on:
the source's path, sizes and modification times, the mode, group size and dtype, the torch
version and the int4 packing this CPU uses. An entry is written to a temporary folder and
renamed into place, so an interrupted run leaves no half entry; one that fails to load is
rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from qwen2.config import Qwen2Config
from qwen2.errors import Qwen2Error
from qwen2.model import Transformer
from qwen2.quant import int4_layout, quantize_model
from qwen2.tokenizer import Tokenizer
from qwen2.weights.default import cache_dir

log = logging.getLogger(__name__)

FORMAT = 1  # bump when what an entry holds changes
ALIGN = 64  # bytes; tensors whose sizes are multiples of it stay aligned in the file


def _aligned(t: torch.Tensor) -> torch.Tensor:
    # the int8 kernel's multi-row path faults on weights that are not 64-byte aligned
    return t if t.data_ptr() % ALIGN == 0 else t.clone()


def _fingerprint(source: Path) -> list:
    files = sorted(p for p in source.iterdir() if p.is_file()) if source.is_dir() else [source]
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def entry_for(source: Path, mode: str, dtype: torch.dtype, group_size: int = 128) -> Path:
    """The cache folder for `source` quantized with these settings (it may not exist yet)."""
    key = json.dumps([FORMAT, str(source.resolve()), _fingerprint(source), mode, group_size, str(dtype),
                      torch.__version__, int4_layout()])
    return cache_dir() / "quantized" / f"{source.stem}-{mode}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def load_entry(entry: Path) -> tuple[Transformer, Tokenizer] | None:
    """The cached model and tokenizer, or None when the entry is missing or unreadable."""
    weights = entry / "model.safetensors"
    if not weights.exists():
        return None
    try:
        config = Qwen2Config.from_hf_json(entry / "config.json")
        tokenizer = Tokenizer.from_files(entry)
        with safe_open(weights, framework="pt") as f:
            settings = f.metadata()
            state = {k: _aligned(f.get_tensor(k)) for k in f.keys()}  # views of the mapped file
        with torch.device("meta"):  # the module tree only, filled from the file below
            model = quantize_model(Transformer(config), settings["mode"], int(settings["group_size"]), empty=True)
        model.load_state_dict(state, assign=True, strict=True)
    except (OSError, SafetensorError, Qwen2Error, KeyError, ValueError, RuntimeError) as e:
        log.warning("ignoring the quantized cache %s (%s); rebuilding it", entry, e)
        return None
    model.set_rope(config)  # the rotary buffer is not in the file
    return model.eval(), tokenizer


def save_entry(entry: Path, model: Transformer, tokenizer: Tokenizer, mode: str, group_size: int = 128) -> None:
    """Write the entry; a failure (disk full, read-only cache) is logged, never raised."""
    tmp = entry.with_name(f"{entry.name}.tmp{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2) + "\n")
        tokenizer.save(tmp)
        tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
        settings = {"mode": mode, "group_size": str(group_size)}
        save_file(tensors, tmp / "model.safetensors", metadata=settings | {"pad": ""})
        with (tmp / "model.safetensors").open("rb") as f:
            header = 8 + int.from_bytes(f.read(8), "little")
        if header % ALIGN:  # a longer header shifts every tensor by the same number of bytes
            pad = " " * (-header % ALIGN)
            save_file(tensors, tmp / "model.safetensors", metadata=settings | {"pad": pad})
        shutil.rmtree(entry, ignore_errors=True)  # an entry that failed to load
        tmp.rename(entry)
    except OSError as e:
        log.warning("could not cache the quantized model in %s (%s); the next start quantizes again", entry, e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
