"""Reading and writing checkpoints one tensor at a time, for merging.

A merge input is an HF checkpoint folder (config.json + safetensors, sharded or not) read
through `safe_open`, or a LoRA adapter (a PEFT folder: adapter_config.json +
adapter_model.safetensors, the layout qwen2.train.lora writes) over a base checkpoint, whose
targeted weights read as W + (alpha / r) B A computed in float32, the update
`lora.merge_lora` folds in, done per tensor so the base model is never built whole. The
output is written as safetensors shards whose header is known before any tensor is computed,
so each tensor goes to disk as soon as it is merged. Not covered: DoRA, per-module ranks
(rank_pattern), adapters that also store whole modules (modules_to_save) or biases.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from qwen2.engine.lora import read_adapter
from qwen2.errors import OptionError, WeightsError
from qwen2.weights import resolve_model
from qwen2.weights.hf import safetensors_files

CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
         torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
         torch.bool: "BOOL"}
DTYPES = {code: dtype for dtype, code in CODES.items()}
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
              "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")


class Source:
    """An HF checkpoint folder's tensors, each read from its memory-mapped file when asked for."""

    def __init__(self, folder: Path, label: str, stack: ExitStack):
        self.label, self.files_folder = label, folder
        try:
            self.config = json.loads((folder / "config.json").read_text())
        except FileNotFoundError:
            raise WeightsError(f"{label}: {folder} has no config.json; an HF checkpoint folder needs one") from None
        except (OSError, json.JSONDecodeError) as e:
            raise WeightsError(f"{label}: {folder}/config.json is unreadable ({e})") from None
        self.names: list[str] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self._handles = {}
        for file in safetensors_files(folder):
            try:
                handle = stack.enter_context(safe_open(file, framework="pt"))
                for name in handle.keys():
                    piece = handle.get_slice(name)
                    self.names.append(name)
                    self.shapes[name] = tuple(piece.get_shape())
                    self.dtypes[name] = DTYPES[piece.get_dtype()]
                    self._handles[name] = handle
            except (SafetensorError, OSError) as e:
                raise WeightsError(f"{label}: {file} is not a readable safetensors file ({e})") from None
            except KeyError as e:
                raise WeightsError(f"{label}: {file} holds a tensor of type {e} that merging does not handle") from None

    def tensor(self, name: str) -> torch.Tensor:
        return self._handles[name].get_tensor(name)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of a tensor (a 0-d tensor whole), read without the rest."""
        if not self.shapes[name]:
            return self.tensor(name)
        return self._handles[name].get_slice(name)[start:stop]


class Adapted(Source):
    """A LoRA adapter over its base: the base's tensors, the targeted ones plus their low-rank update."""

    def __init__(self, folder: Path, base: Source, label: str):
        self.label, self.config, self.files_folder = label, base.config, base.files_folder
        self.names, self.shapes, self.dtypes, self._base = base.names, base.shapes, base.dtypes, base
        self.updates: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # weight: (A, scale * B)
        for module, (a, b) in read_adapter(label, folder, where=label).weights.items():
            weight = f"{module}.weight"
            if weight not in base.shapes or base.shapes[weight] != (b.shape[0], a.shape[1]):
                raise WeightsError(f"{label}: tensor {weight} the adapter updates ({b.shape[0]}x{a.shape[1]}) is "
                                   f"not in its base {base.label} with that shape; the adapter is for another model")
            self.updates[weight] = (a, b)

    def tensor(self, name: str) -> torch.Tensor:
        return self.rows(name, 0, self.shapes[name][0]) if self.shapes[name] else self._base.tensor(name)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        weight = self._base.rows(name, start, stop)
        if name not in self.updates:
            return weight
        a, b = self.updates[name]
        return weight.float() + b[start:stop].float() @ a.float()


def open_source(spec: str, base: Source | None, stack: ExitStack, label: str) -> Source:
    """An HF folder, or a LoRA adapter over `base` (else over the base its config names)."""
    path = resolve_model(spec)
    if path.is_file():
        raise OptionError(f"{label} is a GGUF file; merging reads HF checkpoint folders: convert it first with "
                          f"`qwen2 convert {spec} FOLDER`")
    if not (path / "adapter_config.json").exists():
        return Source(path, label, stack)
    if base is None:
        try:
            named = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        except (OSError, json.JSONDecodeError) as e:
            raise WeightsError(f"{label}: {path}/adapter_config.json is unreadable ({e})") from None
        if not named:
            raise OptionError(f"{label} is a LoRA adapter that names no base model: give --base")
        base = open_source(named, None, stack, f"the base {named} of {label}")
    return Adapted(path, base, label)


def plan_shards(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], max_bytes: int
                ) -> dict[str, list[tuple[str, torch.dtype, tuple[int, ...]]]]:
    """Split (name, dtype, shape) entries, in order, into shards of at most `max_bytes` (a larger
    tensor gets a shard of its own), named as transformers names them."""
    groups: list[list] = [[]]
    size = 0
    for entry in entries:
        nbytes = entry[1].itemsize * math.prod(entry[2])
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += nbytes
    if len(groups) == 1:
        return {"model.safetensors": groups[0]}
    n = len(groups)
    return {f"model-{i:05d}-of-{n:05d}.safetensors": g for i, g in enumerate(groups, 1)}


def write_shard(path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                compute: Callable[[str], torch.Tensor], done: Callable[[], object]) -> None:
    """A safetensors file: an 8-byte header length, the JSON header (padded to 8 bytes), then each
    tensor's bytes in order, each computed by `compute(name)` just before it is written."""
    header, offset = {}, 0
    for name, dtype, shape in entries:
        nbytes = dtype.itemsize * math.prod(shape)
        header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for name, dtype, shape in entries:
            tensor = compute(name)
            if tensor.dtype != dtype or tuple(tensor.shape) != shape:
                raise RuntimeError(f"{name}: computed {tensor.dtype} {list(tensor.shape)}, planned {dtype} {shape}")
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            done()


def copy_side_files(folder: Path, out: Path) -> None:
    """The tokenizer and generation settings that sit beside a checkpoint's weights."""
    for name in SIDE_FILES:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, out / name)
