"""Pick the device and compute dtype.

`default_device()` is CUDA when available, else CPU. `default_dtype(device)` is bf16 on CUDA; on CPU
it is bf16 only where the CPU multiplies bf16 natively (AMX-BF16 or AVX512-BF16 on x86, the BF16
extension on aarch64), else float32: without native support oneDNN emulates bf16 matmul by
converting to fp32, which costs more than the halved weight traffic saves for the float model.
The quantized int8/int4 layers (`qwen2.quant.int_linear`) run their kernels in bf16 whatever this returns.
"""
from __future__ import annotations

import functools
import platform

import torch


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True if this CPU has bf16 dot-product instructions (AMX-BF16, AVX512-BF16 or ARM BF16)."""
    # torch >= 2.5 reports cpuinfo's ISA flags; get_cpu_capability() only names the vector width.
    caps = getattr(torch._C._cpu, "_get_cpu_capability", None)
    if caps is not None and platform.machine() in ("x86_64", "AMD64"):
        flags = caps()
        return bool(flags.get("amx_bf16") or flags.get("avx512_bf16"))
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return False
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 / aarch64
            words = set(value.split())
            return bool(words & {"amx_bf16", "avx512_bf16", "bf16"})
    return False


def default_device() -> torch.device:
    """CUDA if available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """bf16 on CUDA and on CPUs with native bf16 matmul; float32 otherwise."""
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return torch.float32
