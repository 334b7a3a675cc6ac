"""Our compiled CPU kernels: matrix x activations on GGUF's own quantized blocks.

`gguf_ops()` compiles gguf.cpp on first use with this machine's g++ and Ninja
(torch.utils.cpp_extension), for the widest vector ISA the CPU has, and returns the op namespace
(`ops.matmul(x, w, qtype, k)`, `ops.dequantize(w, qtype, k)`; on blocks repacked by
`ops.repack(w, qtype, k)`, `ops.matmul_int8(x, packed, qtype, k)` and `ops.dequantize_packed`); the build lives under
`~/.cache/qwen2/kernels/`, keyed by the source, the flags, the torch version and installation,
and the CPU, so a changed source or another CPU rebuilds it. Without a compiler (or when the build fails) it
returns None after one warning, and the caller keeps the pure-torch path.

Block types with a kernel (ggml-common.h; ../shared reference §8.2): F16, BF16, Q4_0, Q5_0,
Q8_0, Q4_K, Q5_K, Q6_K: every type Qwen2's GGUF files use (the int8 kernels: all but F16 and BF16).
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

# gguf.cpp: float32 activations on the file's own blocks; gguf_int8.cpp: int8 activations on
# blocks repacked into groups of 8 rows (VNNI where the build has it); decode_layer.cpp: a decode
# step's whole layer on those; moe_experts.cpp: an MoE layer's routed experts on those, for a few
# rows (int8_matmul.h: what the last three share); attention_tiles.cpp: a prompt chunk's attention on AMX tiles;
# cross_entropy.cpp: the training loss's softmax on bf16 logits; merging_step.cpp: one OnDARE step of a parameter;
# greedy.cpp: a decode step's greedy tokens
SOURCES = tuple(Path(__file__).with_name(name)
                for name in ("gguf.cpp", "gguf_int8.cpp", "decode_layer.cpp", "moe_experts.cpp", "attention_tiles.cpp",
                                         "cross_entropy.cpp", "merging_step.cpp", "greedy.cpp"))
HEADERS = (Path(__file__).with_name("int8_matmul.h"),)
STALE_LOCK_SECONDS = 600  # a build takes 20 s to 2 min
# GGUF type id -> (weights per block, bytes per block)
BLOCKS = {1: (1, 2), 30: (1, 2), 2: (32, 18), 6: (32, 22), 8: (32, 34), 12: (256, 144), 13: (256, 176), 14: (256, 210)}
TYPE_NAMES = {1: "F16", 30: "BF16", 2: "Q4_0", 6: "Q5_0", 8: "Q8_0", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K"}
# vector ISA -> (cpuinfo flags it needs, compiler flags)
ISAS = {
    "amx": (("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16", "avx512vbmi", "amx_tile",
             "amx_bf16", "fma", "f16c"),
            ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mavx512bf16", "-mavx512vbmi",
             "-mamx-tile", "-mamx-bf16", "-mavx2", "-mfma", "-mf16c")),
    "avx512vnni": (("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "fma", "f16c"),
                   ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mavx2", "-mfma",
                    "-mf16c")),
    "avx512": (("avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"),
               ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c")),
    "avx2vnni": (("avx2", "avx_vnni", "fma", "f16c"), ("-mavx2", "-mavxvnni", "-mfma", "-mf16c")),
    "avx2": (("avx2", "fma", "f16c"), ("-mavx2", "-mfma", "-mf16c")),
}


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo names them (empty where it can't be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def available_isas() -> list[str]:
    """The ISA builds this CPU can run, widest first."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    return [isa for isa, (needs, _) in ISAS.items() if set(needs) <= cpu_flags()]


def _build_dir(isa: str) -> tuple[str, Path]:
    from qwen2.pypi import cache_dir

    key = hashlib.sha256()
    # torch's folder too: the build commands name its headers, so two environments sharing one folder
    # (a project's venv and another) would make ninja rebuild it at each switch, each build holding
    # the lock the other waits on
    for part in (*(source.read_bytes() for source in (*SOURCES, *HEADERS)), b"-fopenmp",
                 " ".join(ISAS[isa][1]).encode(), torch.__version__.encode(),
                 " ".join(sorted(cpu_flags())).encode(), str(Path(torch.__file__).resolve().parent).encode()):
        key.update(part)
    name = f"qwen2_gguf_{isa}_{key.hexdigest()[:12]}"
    return name, cache_dir() / "kernels" / name


# One build per ISA per process, whatever the cache folder says later: a second library registering
# the same op namespace would abort the process.
_LOADED: dict[str, object] = {}
_FAILED: set[str | None] = set()


def gguf_ops(isa: str | None = None):  # noqa: ANN201 (a torch op namespace)
    """The compiled kernels for `isa` (default: the widest this CPU runs), or None if unavailable.

    QWEN2_NO_KERNELS=1 turns them off (the torch fallback runs instead)."""
    isas = available_isas()
    isa = isa or (isas[0] if isas else None)
    if os.environ.get("QWEN2_NO_KERNELS", "") not in ("", "0"):
        return None
    if isa in _LOADED:
        return _LOADED[isa]
    if isa in _FAILED:
        return None
    ops = _build(isa, isas)
    if ops is None:
        _FAILED.add(isa)
    else:
        _LOADED[isa] = ops
    return ops


def _build(isa: str | None, isas: list[str]):  # noqa: ANN202
    if isa is None or isa not in isas:
        _warn(f"this CPU ({platform.machine()}) has no AVX2/FMA/F16C vector unit our kernels are built for")
        return None
    if shutil.which("g++") is None and shutil.which("c++") is None:
        _warn("no C++ compiler (g++) was found")
        return None
    if shutil.which("ninja") is None:  # the ninja wheel's binary, when its bin folder is not on PATH
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
    name, folder = _build_dir(isa)
    folder.mkdir(parents=True, exist_ok=True)
    clear_stale_lock(folder)
    try:
        from torch.utils import cpp_extension

        if not (folder / f"{name}.so").exists():  # the first start waits on g++: say why
            print(f"qwen2: compiling our GGUF kernels for {isa} (once, about 20 s) into {folder}", file=sys.stderr,
                  flush=True)
        # -fopenmp: at::parallel_for is inline OpenMP in torch's CPU builds; without it the loop runs on one thread
        cpp_extension.load(name=name, sources=[str(source) for source in SOURCES], build_directory=str(folder),
                           is_python_module=False,
                           extra_cflags=["-O3", "-fopenmp", f"-DQWEN2_NS={name}", *ISAS[isa][1]],
                           extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # a missing ninja, a compiler error, a read-only cache: all mean "no kernels"
        errors = [line for line in str(e).splitlines() if "error" in line] or [str(e)]
        _warn(f"building them failed ({type(e).__name__}: {' '.join(errors[0].split())[:300]})")
        return None
    return getattr(torch.ops, name)


def clear_stale_lock(folder: Path, older_than: float = STALE_LOCK_SECONDS) -> bool:
    """Remove torch's build lock if it is older than any build: a process killed while building leaves it,
    and every later start would wait on it forever."""
    lock = folder / "lock"
    try:
        if time.time() - lock.stat().st_mtime < older_than:
            return False
        lock.unlink()
    except FileNotFoundError:
        return False
    print(f"qwen2: removed a stale build lock left by an interrupted kernel build ({lock})", file=sys.stderr)
    return True


def _warn(why: str) -> None:
    warnings.warn(f"qwen2: the GGUF block kernels are unavailable: {why}. Falling back to dequantized "
                  "weights (slower decode, more memory); install g++ and ninja to get them.", stacklevel=3)
