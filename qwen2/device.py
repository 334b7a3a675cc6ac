"""Pick the device and compute dtype: `resolve_device` and `resolve_dtype` turn the options
(--device, --dtype; "auto" or None for the defaults below) into torch's, or an OptionError.

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

from qwen2.errors import OptionError
from qwen2.options import DTYPES

TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES if name != "auto"}


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


def resolve_device(name: str | None) -> torch.device:
    """None or "auto": CUDA if present, else CPU. A device this torch cannot use is an OptionError."""
    if name in (None, "auto"):
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise OptionError(f"unknown device {name!r}: choose cpu or cuda (cuda:N for one GPU)") from None
    if device.type == "cuda":
        if torch.version.cuda is None:
            raise OptionError(f"device {name!r}: this build of torch ({torch.__version__}) has no CUDA support; "
                              "use --device cpu or install a CUDA build of torch")
        if not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count():
            raise OptionError(f"device {name!r}: no such CUDA device is visible ({torch.cuda.device_count()} "
                              "found); check the driver and CUDA_VISIBLE_DEVICES, or use --device cpu")
    elif device.type != "cpu":
        raise OptionError(f"device {name!r} is not supported: choose cpu or cuda (cuda:N for one GPU)")
    return device


def resolve_dtype(name: str | None, device: torch.device, exact: bool = False) -> torch.dtype:
    """auto: float32 when `exact` (a mode that computes the weights exactly: GGUF blocks, or what
    tensor parallelism runs in their place), else bf16 on CUDA and on CPUs with native bf16
    matmul, else float32."""
    if name in (None, "auto"):
        return torch.float32 if exact else default_dtype(device)
    if name not in TORCH_DTYPES:
        raise OptionError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return TORCH_DTYPES[name]
