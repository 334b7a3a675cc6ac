"""A real-size Qwen2-MoE to measure MoE code on: the default model (or --model) upcycled into an HF folder.

    .venv/bin/python bench/upcycle_moe.py OUT_DIR [--model SPEC] [--experts 48] [--top-k 8] [--seed 0]
        [--dtype bfloat16]

The recipe is qwen2.weights.upcycle's (fine-grained, as Qwen2-57B-A14B): with the defaults, 48 experts
of 608 neurons, 8 routed per token, plus the dense MLP as the shared expert. The folder (config.json,
model.safetensors, tokenizer, generation_config.json) loads in transformers' Qwen2MoeForCausalLM
and in qwen2 (`--model OUT_DIR`). Prints the wall time of each step and the folder's size; ends with
one JSON line.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from qwen2.weights import load_checkpoint
from qwen2.weights.default import DEFAULT_NAME
from qwen2.weights.export import export_hf
from qwen2.weights.upcycle import upcycle

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", default=DEFAULT_NAME, help="the dense model to upcycle (any qwen2 --model)")
    parser.add_argument("--experts", type=int, default=48)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="of the written tensors (as convert)")
    args = parser.parse_args()
    times = {}
    start = time.perf_counter()
    config, state, tokenizer = load_checkpoint(args.model, dtype=DTYPES[args.dtype])
    times["read_s"] = time.perf_counter() - start
    config, state = upcycle(state, config, experts=args.experts, top_k=args.top_k, seed=args.seed)
    times["upcycle_s"] = time.perf_counter() - start - times["read_s"]
    export_hf(config, state, tokenizer, args.out)
    times["total_s"] = time.perf_counter() - start
    times["write_s"] = times["total_s"] - times["read_s"] - times["upcycle_s"]
    size = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    params = config.num_params()
    print(f"wrote {args.out}: {size / 2**30:.2f} GiB, {params['total'] / 1e9:.2f}B parameters "
          f"({params['active'] / 1e9:.2f}B active), in {times['total_s']:.1f} s ("
          + ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in times.items() if k != "total_s") + ")")
    print(json.dumps({"model": args.model, "out": str(args.out), "experts": args.experts, "top_k": args.top_k,
                      "seed": args.seed, "dtype": args.dtype, "bytes": size, "params": params}
                     | {k: round(v, 2) for k, v in times.items()}))


if __name__ == "__main__":
    main()
