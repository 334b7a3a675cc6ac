"""How weights are held: one table of modes, and one `resolve_quant` that turns "auto" (or a
user's choice) into a mode for this device, this checkpoint and this many processes.

The layers live beside it: weight-only int8/int4 (int_linear.py, torch's kernels), layers on
GGUF's own blocks (blocks.py, our compiled CPU kernels in kernels/), and a GPTQ/AWQ folder's
own int4 integers (prequantized.py). Options, the planner, bench, lm_harness and `info` read
the table; a loaded model records the mode it runs (`LLM.quant`). Torch-free, so that the
command line's --help stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class QuantMode:
    name: str
    kind: str  # "float", "int" (torch's int8/int4 kernels), "blocks" (GGUF blocks), "checkpoint" (GPTQ/AWQ int4)
    devices: tuple[str, ...]  # device types it runs on
    shardable: bool  # runs under tensor parallelism (each rank quantizes its own shard)
    block_type: int | None  # GGUF type id made at load (blocks kind; None: the file's own)
    help: str
    activations: str | None = None  # blocks kind: "int8" (repacked, llama.cpp's rounding) or "float32" (exact)


MODES: dict[str, QuantMode] = {m.name: m for m in (
    QuantMode("none", "float", ("cpu", "cuda"), True, None, "float weights at --dtype"),
    QuantMode("int8", "int", ("cpu", "cuda"), True, None, "per-channel int8, torch's kernel (bf16 activations); "
              "on CUDA ours in Triton"),
    QuantMode("int4", "int", ("cpu", "cuda"), True, None, "group-wise int4, torch's kernel (bf16 activations); "
              "a GPTQ/AWQ folder's own int4"),
    QuantMode("gguf", "blocks", ("cpu", "cuda"), False, None, "a GGUF file's own blocks through our integer kernels "
              "(activations rounded to int8 per 32, as llama.cpp does); on CUDA through our Triton kernels, "
              "activations at --dtype", "int8"),
    QuantMode("gguf-f32", "blocks", ("cpu",), False, None, "a GGUF file's own blocks with float32 activations: "
              "exactly the file's weights (slower)", "float32"),
    QuantMode("q8_0", "blocks", ("cpu",), False, 8, "Q8_0 blocks made at load, our integer kernels", "int8"),
    QuantMode("q4_k", "blocks", ("cpu",), False, 12, "Q4_K blocks made at load (Q8_0 where rows don't fit), our "
              "integer kernels", "int8"),
    QuantMode("gptq", "checkpoint", ("cpu", "cuda"), False, None, "a GPTQ folder's own int4 integers"),
    QuantMode("awq", "checkpoint", ("cpu", "cuda"), False, None, "an AWQ folder's own int4 integers"),
)}
CHOICES = ("auto", *MODES)
# GGUF block types a file may hold that the planner sizes beside the modes (they run as "gguf")
FILE_BLOCK_TYPES = ("q8_0", "q6_k", "q5_k", "q5_0", "q4_k", "q4_0")
# their GGML type ids, which our Triton kernels decode on CUDA (quant/triton_blocks.py)
CUDA_BLOCK_TYPES = (8, 14, 13, 6, 12, 2)


def file_blocks(mode: str) -> bool:
    """Whether the mode runs a GGUF file's own blocks (rather than making blocks at load)."""
    return MODES[mode].kind == "blocks" and MODES[mode].block_type is None


def describe() -> str:
    """One line per mode, for --help."""
    return "; ".join(f"{m.name}: {m.help}" for m in MODES.values())


def resolve_quant(quant: str | None, device: str, source: Path | None = None, world_size: int = 1) -> str:
    """The mode a request runs. auto: a GPTQ/AWQ folder its own int4; on CPU a GGUF its own
    blocks and an HF checkpoint Q8_0 blocks made at load (int8 where the kernels cannot be built);
    on CUDA a GGUF its own blocks (Triton kernels) and an HF checkpoint float; under tensor
    parallelism, float. An explicit mode is checked against the device,
    the checkpoint and the process count, and refused with what to use instead."""
    from qwen2.errors import OptionError
    from qwen2.weights.gptq_awq import is_int4_checkpoint

    quant = quant or "auto"
    if quant not in CHOICES:
        raise OptionError(f"unknown quant {quant!r}; choose one of {', '.join(CHOICES)}")
    int4_folder = source is not None and source.is_dir() and is_int4_checkpoint(source)
    is_gguf = source is not None and source.is_file()
    if quant == "auto":
        if int4_folder and world_size == 1:
            return "gptq"
        if device == "cuda" and is_gguf and world_size == 1 and _triton():
            return "gguf"
        if device != "cpu" or world_size > 1:
            return "none"
        return ("gguf" if is_gguf else "q8_0") if _kernels() else "int8"
    if quant == "int4" and int4_folder and world_size == 1:
        return "gptq"
    mode = MODES[quant]
    if device not in mode.devices:
        instead = "gguf (our Triton kernels) or none" if file_blocks(quant) and device == "cuda" else "none or int8"
        raise OptionError(f"--quant {quant} runs on {' or '.join(mode.devices)}, not {device}; use {instead}")
    if world_size > 1 and not mode.shardable:
        shardable = ", ".join(m.name for m in MODES.values() if m.shardable)
        raise OptionError(f"--quant {quant} is not available under tensor parallelism (torchrun): choose one of "
                          f"{shardable}, or run one process")
    if file_blocks(quant) and not is_gguf:
        raise OptionError(f"--quant {quant} runs a GGUF file's own blocks, and this model is not a GGUF; use q8_0 "
                          "or q4_k to run an HF checkpoint on the same kernels")
    if mode.kind == "checkpoint" and not int4_folder:
        raise OptionError(f"--quant {quant} runs a {quant.upper()} folder's own int4 weights, and this model is not "
                          "one; use int4 to quantize it at load")
    if mode.kind == "blocks" and device == "cuda" and not _triton():
        raise OptionError(f"--quant {quant} on CUDA needs Triton (it comes with torch's CUDA builds), which is not "
                          "installed here; install it, or use none")
    if mode.kind == "blocks" and device == "cpu" and not _kernels():
        raise OptionError(f"--quant {quant} needs our compiled kernels, which could not be built here (see the "
                          "warning above); use int8 or none")
    return quant


def _kernels() -> bool:
    from qwen2.quant.blocks import kernels_available

    return kernels_available()


def _triton() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None
