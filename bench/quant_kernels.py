"""Linear-layer kernels on CPU for the Qwen2.5-0.5B shapes: µs per call and weight GB/s.

Ours: the GGUF block kernels (qwen2.quant.kernels, one row per block type the default file uses, with
float32 activations on the file's rows and with int8 activations on the rows repacked, plus the
dequantize-a-tile-then-GEMM path BlockLinear takes above BLOCK_KERNEL_MAX_ROWS); beside them
torch's own CPU kernels (F.linear, oneDNN, int8/int4 packed GEMVs, ao dynamic quantization).

Batch-1 decode reads every weight byte once per token, so a kernel's worth is its weight bytes /
time against the machine's read bandwidth (measured here with a big tensor sum). Each (shape, rows)
cell cycles every method over a ring of weight copies (>= 64 MB, so small layers come from DRAM as
they do in a real decode step, at most 512 copies); methods are interleaved round by round so a
noisy neighbour hits all of them alike, and the median round is reported. Then a whole 24-layer
0.5B decode step (M = 1, all projections + lm_head, using qwen2.quant.int_linear's modules) is timed.

    .venv/bin/python bench/quant_kernels.py [--rows 1 4 16 64 128 512] [--rounds 7] [--compile]
        [--threads 1 --cpu-clock]   # on a busy machine: single-thread CPU time, unaffected by neighbours

Ends with one JSON line. Not covered: attention, norms, the KV cache; numbers are for this CPU.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qwen2.quant import blocks as block_layers
from qwen2.quant import int_linear as quant
from qwen2.quant.int_linear import Int4Linear, Int8Linear, quantize_int4, quantize_int8
from qwen2.quant.kernels import BLOCKS, TYPE_NAMES, gguf_ops

SHAPES = {  # name: (out_features N, in_features K)
    "q/o_proj": (896, 896),
    "k/v_proj": (128, 896),
    "gate/up_proj": (4864, 896),
    "down_proj": (896, 4864),
    "lm_head": (151936, 896),
}
LAYERS, VOCAB = 24, 151936
RING_BYTES = 64 << 20
bf16 = torch.bfloat16
clock = time.perf_counter  # --cpu-clock: process CPU time, which a busy neighbour doesn't inflate


@dataclass
class Method:
    name: str
    act: torch.dtype
    prepare: Callable[[Tensor, int], object]  # (fp32 weight, rows) -> state
    call: Callable[[Tensor, object], Tensor]  # (x, state) -> y
    max_rows: int = 1 << 30
    # a ring copy of a state; None: call prepare() again (opaque states)
    copy: Callable[[object], object] | None = lambda s: tuple(t.clone() if isinstance(t, Tensor) else t for t in s)


def nbytes(state: object) -> int:
    if isinstance(state, tuple):
        return sum(t.nbytes for t in state if isinstance(t, Tensor))
    if callable(getattr(state, "weight", None)):  # ao dynamic Linear: int8 weight + fp32 scale per row
        w = state.weight()
        return w.numel() + 4 * w.shape[0]
    return sum(b.nbytes for b in state.buffers())


def _int4_state(w: Tensor, gs: int, dtype: torch.dtype) -> tuple:
    q, scale, zero = quantize_int4(w, gs, dtype)
    return torch._convert_weight_to_int4pack_for_cpu(q, 1), torch.stack([scale, zero], -1).transpose(0, 1).contiguous()


def _ao_dynamic(engine: str) -> Callable[[Tensor, int], nn.Module]:
    def prepare(w: Tensor, rows: int) -> nn.Module:
        torch.backends.quantized.engine = engine  # the prepacked weight keeps its engine
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight.data = w
        lin.qconfig = torch.ao.quantization.default_dynamic_qconfig
        return torch.ao.nn.quantized.dynamic.Linear.from_float(lin)
    return prepare


def _module(cls: type[nn.Module]) -> Callable[[Tensor, int], nn.Module]:
    def prepare(w: Tensor, rows: int) -> nn.Module:
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight.data = w
        return cls(lin)
    return prepare


def _dequant_path(x: Tensor, layer: nn.Module) -> Tensor:
    """The layer with its kernel row limit forced to 0: dequantize row blocks + F.linear."""
    saved = quant.INT8_KERNEL_MAX_ROWS, quant.INT4_KERNEL_MAX_ROWS
    quant.INT8_KERNEL_MAX_ROWS = quant.INT4_KERNEL_MAX_ROWS = -1
    try:
        return layer(x)
    finally:
        quant.INT8_KERNEL_MAX_ROWS, quant.INT4_KERNEL_MAX_ROWS = saved


def _dyn_quant_4bit(w: Tensor, rows: int) -> tuple:
    """KleidiAI's op (ARM); on x86 a reference fallback that stores the weight as fp32 pairs."""
    n, k = w.shape
    q, scale, _ = quantize_int4(w, 32)  # asymmetric q with symmetric-style scales: timing only
    nib = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)
    return torch.ops.aten._dyn_quant_pack_4bit_weight(nib, scale, None, 32, k, n), n


def gguf_blocks(w: Tensor, qtype: int) -> Tensor:
    """Timing-grade blocks of `qtype` for w's shape: random bits with sane float16 scales."""
    n_block, n_bytes = BLOCKS[qtype]
    gen = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (w.shape[0], w.shape[1] // n_block, n_bytes), dtype=torch.uint8, generator=gen)
    scale = torch.full(raw.shape[:2], 0.01, dtype=torch.float16).view(torch.uint8).view(*raw.shape[:2], 2)
    for offset in {1: (), 30: (), 12: (0, 2), 13: (0, 2), 14: (208,)}.get(qtype, (0,)):
        raw[:, :, offset : offset + 2] = scale
    if qtype in (1, 30):  # F16 / BF16: the values themselves
        raw = w.to(torch.float16 if qtype == 1 else torch.bfloat16).view(torch.uint8).view(w.shape[0], -1, 2)
    return raw.reshape(w.shape[0], -1)


def _block_tile_path(x: Tensor, layer: nn.Module) -> Tensor:
    saved = block_layers.BLOCK_KERNEL_MAX_ROWS
    block_layers.BLOCK_KERNEL_MAX_ROWS = -1
    try:
        return layer(x)
    finally:
        block_layers.BLOCK_KERNEL_MAX_ROWS = saved


def gguf_methods() -> list[Method]:
    if gguf_ops() is None:
        return []
    ms = []
    for qtype in (6, 8, 12, 14, 1):  # Q5_0, Q8_0, Q4_K, Q6_K (the default file's), F16
        def prepare(w: Tensor, rows: int, qtype: int = qtype) -> tuple:
            if w.shape[1] % BLOCKS[qtype][0]:
                raise ValueError(f"{TYPE_NAMES[qtype]} needs in_features % {BLOCKS[qtype][0]} == 0")
            return gguf_blocks(w, qtype), qtype, w.shape[1]
        ms.append(Method(f"gguf {TYPE_NAMES[qtype]} block kernel (ours, fp32)", torch.float32, prepare,
                         lambda x, s: gguf_ops().matmul(x, s[0], s[1], s[2]), max_rows=128))
    for qtype in (6, 8, 12, 14):  # the same blocks repacked, int8 activations (the default since they came)
        def prepare_int8(w: Tensor, rows: int, qtype: int = qtype) -> tuple:
            if w.shape[1] % BLOCKS[qtype][0]:
                raise ValueError(f"{TYPE_NAMES[qtype]} needs in_features % {BLOCKS[qtype][0]} == 0")
            return gguf_ops().repack(gguf_blocks(w, qtype), qtype, w.shape[1]), qtype, w.shape[1]
        ms.append(Method(f"gguf {TYPE_NAMES[qtype]} int8 kernel (ours, repacked)", torch.float32, prepare_int8,
                         lambda x, s: gguf_ops().matmul_int8(x, s[0], s[1], s[2]), max_rows=128))
    ms.append(Method("gguf Q5_0 BlockLinear tile path (ours, fp32)", torch.float32,
                     lambda w, r: block_layers.BlockLinear(gguf_blocks(w, 8), 8, w.shape[1]), _block_tile_path,
                     copy=copy.deepcopy))
    return ms


def methods(with_compile: bool) -> list[Method]:
    ms = gguf_methods() + [
        Method("fp32 F.linear", torch.float32, lambda w, r: (w.clone(),), lambda x, s: F.linear(x, s[0])),
        Method("bf16 F.linear", bf16, lambda w, r: (w.to(bf16),), lambda x, s: F.linear(x, s[0])),
        Method("bf16 oneDNN prepacked", bf16,
               lambda w, r: (torch.ops.mkldnn._reorder_linear_weight(w.to(bf16), r),),
               lambda x, s: torch.ops.mkldnn._linear_pointwise(x, s[0], None, "none", [], ""), copy=None),
        Method("int8 _weight_int8pack_mm bf16", bf16, lambda w, r: quantize_int8(w, bf16),
               lambda x, s: torch._weight_int8pack_mm(x, s[0], s[1])),
        Method("int8 _weight_int8pack_mm fp32", torch.float32, lambda w, r: quantize_int8(w, torch.float32),
               lambda x, s: torch._weight_int8pack_mm(x, s[0], s[1]), max_rows=4),
        Method("int8 Int8Linear dequant path (bf16)", bf16, _module(Int8Linear), _dequant_path, copy=copy.deepcopy),
        Method("int8 ao dynamic onednn (A8 fp32)", torch.float32, _ao_dynamic("onednn"), lambda x, m: m(x),
               copy=copy.deepcopy),
        Method("int8 ao dynamic fbgemm (A8 fp32)", torch.float32, _ao_dynamic("fbgemm"), lambda x, m: m(x),
               copy=copy.deepcopy),
    ]
    for gs in (32, 64, 128):
        ms.append(Method(f"int4 _weight_int4pack_mm_for_cpu bf16 g{gs}", bf16,
                         lambda w, r, gs=gs: _int4_state(w, gs, bf16),
                         lambda x, s, gs=gs: torch._weight_int4pack_mm_for_cpu(x, s[0], gs, s[1]),
                         max_rows=1 << 30 if gs == 128 else 64))  # group size barely matters at prefill
    ms += [
        Method("int4 _weight_int4pack_mm_for_cpu fp32 g128", torch.float32,
               lambda w, r: _int4_state(w, 128, torch.float32),
               lambda x, s: torch._weight_int4pack_mm_for_cpu(x, s[0], 128, s[1]), max_rows=4),
        Method("int4 Int4Linear dequant path (bf16) g128", bf16, _module(Int4Linear), _dequant_path,
               copy=copy.deepcopy),
        Method("int4 _dyn_quant_matmul_4bit fp32 g32", torch.float32, _dyn_quant_4bit,
               lambda x, s: torch.ops.aten._dyn_quant_matmul_4bit(x, s[0], 32, x.shape[1], s[1]),
               max_rows=16),
    ]
    if with_compile:  # inductor turns these into fused reductions (GEMV) for M = 1
        gemv8 = torch.compile(lambda x, q, s: (x[:, None, :] * q.float()).sum(-1) * s, dynamic=False)
        ms.append(Method("int8 torch.compile GEMV fp32", torch.float32, lambda w, r: quantize_int8(w, torch.float32),
                         lambda x, s: gemv8(x, s[0], s[1]), max_rows=1))

        def deq4(x: Tensor, nib: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
            n = nib.shape[0]
            q = torch.stack([nib & 15, nib >> 4], -1).reshape(n, -1).float()
            w = (q.reshape(n, scale.shape[1], -1) - 8) * scale[..., None] + zero[..., None]
            return (x[:, None, :] * w.reshape(n, -1)).sum(-1)
        gemv4 = torch.compile(deq4, dynamic=False)

        def prep4(w: Tensor, r: int) -> tuple:
            q, scale, zero = quantize_int4(w, 128, torch.float32)
            return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8), scale, zero
        ms.append(Method("int4 torch.compile dequant-GEMV fp32 g128", torch.float32, prep4,
                         lambda x, s: gemv4(x, *s), max_rows=1))
    return ms


def read_bandwidth(gib: float = 0.5, reps: int = 11) -> float:
    """GB/s of a 2-thread fp32 sum over a buffer far larger than the caches (median of reps)."""
    a = torch.ones(int(gib * (1 << 30)) // 4)
    a.sum()
    ts = []
    for _ in range(reps):
        t = clock()
        a.sum()
        ts.append(clock() - t)
    return a.nbytes / statistics.median(ts) / 1e9


def bench_cell(ms: list[Method], w: Tensor, rows: int, rounds: int) -> dict[str, tuple[float, float, float]]:
    """{method: (median µs per call, weight GB/s at the median, best µs)} for one shape and row count."""
    rings, xs, sizes = {}, {}, {}
    for m in ms:
        if rows > m.max_rows:
            continue
        try:
            s = m.prepare(w, rows)
            size = nbytes(s)
            n = 1 if rows > 64 else max(1, min(512, RING_BYTES // max(size, 1)))
            rings[m.name] = [s] + [(m.prepare(w, rows) if m.copy is None else m.copy(s)) for _ in range(n - 1)]
            xs[m.name], sizes[m.name] = torch.randn(rows, w.shape[1]).to(m.act), size
            m.call(xs[m.name], s)  # warm-up (and compile)
        except Exception as e:  # an op missing or refusing this shape is a result too
            print(f"  {m.name}: unavailable ({type(e).__name__}: {str(e)[:80]})")
            rings.pop(m.name, None)
    times: dict[str, list[float]] = {k: [] for k in rings}
    by_name = {m.name: m for m in ms}
    for _ in range(rounds):
        for name, ring in rings.items():
            call, x = by_name[name].call, xs[name]
            t = clock()
            for s in ring:
                call(x, s)
            times[name].append((clock() - t) / len(ring))
    return {name: (statistics.median(ts) * 1e6, sizes[name] / statistics.median(ts) / 1e9, min(ts) * 1e6)
            for name, ts in times.items()}


@torch.no_grad()
def decode_step(rounds: int) -> dict[str, dict]:
    """Time all linear layers of a 0.5B decode step (M = 1) as our modules run them."""
    layer_shapes = [SHAPES["q/o_proj"], SHAPES["k/v_proj"], SHAPES["k/v_proj"], SHAPES["q/o_proj"],
                    SHAPES["gate/up_proj"], SHAPES["gate/up_proj"], SHAPES["down_proj"]]
    shapes = layer_shapes * LAYERS + [(VOCAB, 896)]
    float_layers = []
    for n, k in shapes:
        lin = nn.Linear(k, n, bias=False)
        nn.init.normal_(lin.weight, std=0.02)
        float_layers.append(lin)
    file_types = {(896, 896): 6, (128, 896): 6, (4864, 896): 6, (896, 4864): 12, (VOCAB, 896): 8}  # as the file

    def as_file(lin: nn.Linear) -> nn.Module:
        qtype = file_types[(lin.out_features, lin.in_features)]
        return block_layers.BlockLinear(gguf_blocks(lin.weight.detach(), qtype), qtype, lin.in_features)

    variants: dict[str, Callable[[nn.Linear], nn.Module]] = {
        "fp32 nn.Linear": lambda lin: lin,
        "bf16 nn.Linear": lambda lin: copy.deepcopy(lin).to(bf16),
        "Int8Linear": Int8Linear,
        "Int4Linear g32": lambda lin: Int4Linear(lin, 32),
        "Int4Linear g64": lambda lin: Int4Linear(lin, 64),
        "Int4Linear g128": lambda lin: Int4Linear(lin, 128),
    }
    if gguf_ops() is not None:
        variants["gguf blocks as the file (ours)"] = as_file
    res = {}
    for name, make in variants.items():
        layers = [make(lin) for lin in float_layers]
        size = sum(b.nbytes for m in layers for b in list(m.parameters()) + list(m.buffers()))
        dtype = torch.float32 if name.startswith(("fp32", "gguf")) else bf16
        x = torch.randn(1, 896, dtype=dtype)
        xd = torch.randn(1, 4864, dtype=dtype)
        ts = []
        for _ in range(rounds + 1):
            t = clock()
            for m in layers:
                m(xd if m.in_features == 4864 else x)
            ts.append(clock() - t)
        t = statistics.median(ts[1:])
        res[name] = {"ms": t * 1e3, "best_ms": min(ts[1:]) * 1e3, "MB": size / 1e6, "GB_s": size / t / 1e9}
        print(f"{name:18s} {t * 1e3:8.1f} ms/token (best {min(ts[1:]) * 1e3:.1f})  {size / 1e6:7.1f} MB  "
              f"{size / t / 1e9:5.1f} GB/s")
        del layers
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64, 128, 512])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--compile", action="store_true", help="also torch.compile'd GEMVs (slow to build)")
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--cpu-clock", action="store_true",
                   help="time with process CPU time: robust on a shared machine, meaningful with --threads 1")
    args = p.parse_args()
    global clock
    if args.cpu_clock:
        clock = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {clock.__name__}, "
          f"capability {torch.backends.cpu.get_cpu_capability()}, load {os.getloadavg()[0]:.2f}")
    bw = read_bandwidth()
    print(f"read bandwidth (fp32 sum, 512 MiB): {bw:.1f} GB/s\n")
    ms = methods(args.compile)
    results: dict = {"read_GB_s": bw, "threads": torch.get_num_threads(), "clock": clock.__name__, "cells": {}}
    for shape in args.shapes:
        n, k = SHAPES[shape]
        w = torch.randn(n, k) * 0.02
        for rows in args.rows:
            if shape == "lm_head" and rows > 16:
                continue  # logits are needed for the last position only
            print(f"{shape} [{n}x{k}], M={rows}")
            cell = bench_cell(ms, w, rows, args.rounds if rows <= 64 else 3)
            for name, (us, gbs, best) in cell.items():
                print(f"  {name:45s} {us:11.1f} µs  {gbs:6.1f} GB/s  (best {best:.1f} µs)")
            results["cells"][f"{shape} M={rows}"] = {
                k_: {"us": v[0], "GB_s": v[1], "best_us": v[2]} for k_, v in cell.items()}
    if not args.skip_decode:
        print("\n0.5B decode step, all linear layers, M=1:")
        results["decode_step"] = decode_step(args.rounds)
    results["read_GB_s_end"] = read_bandwidth()
    results["load_end"] = os.getloadavg()[0]
    print(f"\nread bandwidth at the end: {results['read_GB_s_end']:.1f} GB/s, load {results['load_end']:.2f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
