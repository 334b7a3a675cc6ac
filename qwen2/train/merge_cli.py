"""`qwen2 merge`: merge fine-tunes of one base model (see merge.py for each method's formula).

    qwen2 merge --method linear|task_arithmetic|ties|dare_linear|dare_ties [--base B] MODEL... --out DIR
        [--weights W1,W2,...] [--density D] [--normalize | --no-normalize] [--seed S] [--dtype T]
        [--max-shard-size 5GB]
"""

from __future__ import annotations

import argparse
import json

METHOD_NAMES = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties")
UNITS = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30, "b": 1}


def byte_size(text: str) -> int:
    """"5GB" -> 5e9, "500MiB" -> 500 * 2**20, "1000" -> 1000."""
    low = text.strip().lower()
    unit = next((u for u in sorted(UNITS, key=len, reverse=True) if low.endswith(u)), "b")
    try:
        value = float(low.removesuffix(unit)) * UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB or 500MB)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return int(value)


def weight_list(text: str) -> list[float]:
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"weights are numbers separated by commas, e.g. 0.7,0.3; got {text!r}") \
            from None


def add_arguments(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("merge", help="merge fine-tunes of one base model (linear, task arithmetic, TIES, "
                              "DARE) into an HF folder, streaming tensor by tensor")
    p.add_argument("models", nargs="+", metavar="MODEL", help="HF checkpoint folders or LoRA adapter folders (an "
                   "adapter is applied to --base, or to the base its config names)")
    p.add_argument("--method", required=True, choices=METHOD_NAMES)
    p.add_argument("--base", help="the model the MODELs were fine-tuned from (task vectors are MODEL - base); "
                   "required by every method but linear")
    p.add_argument("--out", required=True, help="the folder to write (must not exist or be empty)")
    p.add_argument("--weights", type=weight_list, help="one weight per MODEL (default 1 each)")
    p.add_argument("--density", type=float, help="ties/dare: fraction of each task vector kept (default 1: "
                   "nothing dropped; 0.5 is common)")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, help="divide by the sum of the weights "
                   "(default as mergekit: on for linear and ties, off for the others)")
    p.add_argument("--seed", type=int, default=0, help="dare: seed of the drop masks (default 0)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="stored dtype of the output "
                   "(default: the base's)")
    p.add_argument("--max-shard-size", type=byte_size, default="5GB", help="largest safetensors file written "
                   "(default %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    import torch

    from qwen2.train.merge import merge

    dtype = getattr(torch, args.dtype) if args.dtype else None
    summary = merge(args.method, args.models, args.out, base=args.base, weights=args.weights, density=args.density,
                    normalize=args.normalize, seed=args.seed, dtype=dtype, max_shard_bytes=args.max_shard_size)
    print(json.dumps(summary))
