"""How much weight-only quantization changes the default model's predictions on real text.

    python bench/quant_quality.py [--positions 2000] [--window 500]

Reference: the GGUF dequantized to float32. For bf16 (no quantization), int8 and int4 we
report top-1 agreement with the reference and the mean KL(reference || variant) over the
next-token distributions at every position of Wikipedia text (windows of --window tokens).
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from qwen2.eval.data import haystack_text
from qwen2.model import Transformer
from qwen2.quant import quantize_model
from qwen2.weights import load_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--positions", type=int, default=2000)
    ap.add_argument("--window", type=int, default=500)
    args = ap.parse_args()

    config, state_dict, tokenizer = load_checkpoint(args.model, dtype=torch.float32)
    reference = Transformer.from_state_dict(config, state_dict)
    # what `load()` runs on a CPU with native bf16: bf16 activations, float or quantized weights
    variants = {"bf16": Transformer.from_state_dict(config, state_dict, dtype=torch.bfloat16)}
    del state_dict
    for mode in ("int8", "int4"):
        variants[mode] = quantize_model(copy.deepcopy(variants["bf16"]), mode)
    ids = tokenizer.encode(haystack_text())[: args.positions + 1]
    stats = {name: {"agree": 0, "kl": 0.0, "seconds": 0.0} for name in variants}
    with torch.inference_mode():
        for start in range(0, args.positions, args.window):
            window = torch.tensor([ids[start: min(start + args.window, args.positions)]])
            ref_logp = reference(window)[0].float().log_softmax(-1)
            for name, model in variants.items():
                t = time.perf_counter()
                logp = model(window)[0].float().log_softmax(-1)
                stats[name]["seconds"] += time.perf_counter() - t
                stats[name]["agree"] += int((logp.argmax(-1) == ref_logp.argmax(-1)).sum())
                stats[name]["kl"] += float((ref_logp.exp() * (ref_logp - logp)).sum())
    print(f"{args.positions} positions of Wikipedia text, windows of {args.window}; reference float32")
    print(f"{'variant':<26}{'top-1 agree':>12}{'mean KL':>10}")
    result = {}
    for name, s in stats.items():
        result[name] = {"top1_agreement": s["agree"] / args.positions, "mean_kl": s["kl"] / args.positions}
        print(f"{name:<26}{100 * result[name]['top1_agreement']:>11.2f}%{result[name]['mean_kl']:>10.4f}")
    print(json.dumps({"positions": args.positions, "results": result}))


if __name__ == "__main__":
    main()
