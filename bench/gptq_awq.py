"""GPTQ / AWQ int4 layers (qwen2.quant.prequantized): dequantization error and batch-1 decode speed.

1. Error: random 4-bit integers at a Qwen2-7B q_proj shape (3584 x 3584, group 128) in each format's
   zero convention, with fp16 scales like a real checkpoint's (0.001-0.03); the int4 layer's weight
   (bf16 scale and zero, as its kernel uses them) against float64 (q - z) * s of the same integers.
2. Speed: a random Qwen2 of a preset's shape, its Linears GPTQ-int4 (lm_head and embedding float,
   as the official checkpoints ship them; with and without desc_act's input gather), against the
   same model dequantized to bf16 and that bf16 model re-quantized to int8 (`--quant int8` on such
   a folder); greedy decode through the engine.
   The model is built in memory from the integers: loading from disk is not timed here.

    .venv/bin/python bench/gptq_awq.py [--preset Qwen2-0.5B] [--tokens 48] [--runs 3]
        [--threads 1 --cpu-clock]   # on a busy machine: single-thread CPU time, unaffected by neighbours

Ends with one JSON line. Numbers are for this CPU and its load at the time (shared cores).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from torch import nn

from qwen2.config import Qwen2Config
from qwen2.engine.engine import Engine
from qwen2.engine.sampling import SamplingParams
from qwen2.model import Transformer
from qwen2.quant.int_linear import quantize_model
from qwen2.quant.prequantized import to_int4_linear
from qwen2.tokenizer import Tokenizer
from qwen2.weights.default import default_model_path
from qwen2.weights.gguf import read_metadata
from qwen2.weights.gptq_awq import UnpackedLinear, dequantize

FORMATS = {  # name: stored zero range (GPTQ v1 reads z = nibble + 1)
    "gptq sym (z = 8)": (8, 8),
    "gptq asym v1 (z 1..16)": (1, 16),
    "awq (z 0..15)": (0, 15),
}


def random_layer(n: int, k: int, group: int, zeros: tuple[int, int], desc_act: bool, gen) -> UnpackedLinear:
    g_idx = torch.arange(k) // group
    if desc_act:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    return UnpackedLinear(
        q=torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8),
        zeros=torch.randint(zeros[0], zeros[1] + 1, (k // group, n), generator=gen, dtype=torch.int32),
        scales=(torch.rand(k // group, n, generator=gen) * 0.029 + 0.001).half().float(), g_idx=g_idx)


def error_table(gen) -> list[dict]:
    rows = []
    for name, zeros in FORMATS.items():
        for desc_act in (False, True) if name.startswith("gptq") else (False,):  # AWQ has no g_idx
            layer = random_layer(3584, 3584, 128, zeros, desc_act, gen)
            exact = dequantize(layer, torch.float64)
            int4 = to_int4_linear(layer, 128, None)
            stored = int4.dequantize(torch.float64)
            w = stored if int4.input_perm is None else torch.empty_like(stored).index_copy_(1, int4.input_perm, stored)
            err = (w - exact).abs()
            step = layer.scales[layer.g_idx].T.double()  # s of each weight
            rows.append({"format": name, "desc_act": desc_act, "max_abs": err.max().item(),
                         "max_in_steps": (err / step).max().item(),
                         "rel_fro": ((w - exact).norm() / exact.norm()).item()})
    return rows


def random_models(preset: str, desc_act: bool, gen) -> tuple[Transformer, Transformer]:
    """(GPTQ-int4 model, the same weights dequantized to bf16)."""
    config = Qwen2Config.from_preset(preset)
    with torch.device("meta"):
        floats = Transformer(config)
    floats = floats.to_empty(device="cpu").to(torch.bfloat16).eval()
    for p in floats.parameters():
        p.data.normal_(0, 0.02, generator=gen)
    floats.set_rope(config)
    int4 = copy.deepcopy(floats)
    for name, linear in list(int4.named_modules()):
        if not isinstance(linear, nn.Linear) or name == "lm_head":
            continue
        layer = random_layer(linear.out_features, linear.in_features, 128, (1, 16), desc_act, gen)
        parent, _, child = name.rpartition(".")
        bias = None if linear.bias is None else linear.bias.detach()
        setattr(int4.get_submodule(parent), child, to_int4_linear(layer, 128, bias))
        floats.get_submodule(name).weight.data = dequantize(layer, torch.bfloat16)
    return int4, floats


def decode_tps(model: Transformer, tokenizer: Tokenizer, tokens: int, runs: int, clock) -> float:
    engine = Engine(model, tokenizer, max_concurrency=1, max_seq_len=256)
    rates = []
    for _ in range(runs + 1):  # the first run warms up
        request = engine.submit(list(range(1000, 1016)), SamplingParams(max_tokens=tokens, temperature=0))
        first = None
        for _ in engine.stream(request):
            first = first or clock()
        rates.append((len(request.output) - 1) / (clock() - first))
    return statistics.median(rates[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="Qwen2-0.5B")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--cpu-clock", action="store_true",
                        help="time with process CPU time (with --threads 1: unaffected by busy neighbours)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_clock else time.perf_counter
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        errors = error_table(gen)
        print("| format | desc_act | max abs error | max error / s | relative (Frobenius) |\n|---|---|---|---|---|")
        for r in errors:
            print(f"| {r['format']} | {r['desc_act']} | {r['max_abs']:.2e} | {r['max_in_steps']:.4f} | "
                  f"{r['rel_fro']:.2e} |", flush=True)
        tokenizer = Tokenizer.from_gguf_metadata(read_metadata(default_model_path()))
        int4, floats = random_models(args.preset, True, gen)
        speed = {"gptq_int4_desc_act": decode_tps(int4, tokenizer, args.tokens, args.runs, clock)}
        del int4
        int4, floats = random_models(args.preset, False, gen)
        speed |= {"gptq_int4": decode_tps(int4, tokenizer, args.tokens, args.runs, clock),
                  "bf16": decode_tps(floats, tokenizer, args.tokens, args.runs, clock)}
        speed["int8_requantized"] = decode_tps(quantize_model(floats, "int8"), tokenizer, args.tokens, args.runs,
                                               clock)
    print(f"\n{args.preset} batch-1 greedy decode, tok/s (median of {args.runs}, {args.tokens} tokens, "
          f"{args.threads} threads, {'CPU' if args.cpu_clock else 'wall'} clock): "
          + ", ".join(f"{k} {v:.1f}" for k, v in speed.items()))
    print(json.dumps({"errors": errors, "preset": args.preset, "threads": args.threads,
                      "cpu_clock": args.cpu_clock, "decode_tps": speed}))


if __name__ == "__main__":
    main()
