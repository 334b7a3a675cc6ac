"""How much weight-only quantization changes the default model's predictions on real text.

    python bench/quant_quality.py [--positions 2000] [--window 500] [--group-sizes 128,64,32]

Reference: the GGUF dequantized to float32. For bf16 (no quantization), int8 and int4 at
each group size we report top-1 agreement with the reference and the mean KL(reference ||
variant) over the next-token distributions at every position of Wikipedia text (windows of
--window tokens); and the same against the bf16 model, which isolates what the weight
quantization adds to bf16 activations.
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
    ap.add_argument("--group-sizes", default="128,64,32", help="int4 group sizes to compare")
    args = ap.parse_args()

    config, state_dict, tokenizer = load_checkpoint(args.model, dtype=torch.float32)
    reference = Transformer.from_state_dict(config, state_dict)
    # what `load()` runs on a CPU with native bf16: bf16 activations, float or quantized weights
    variants = {"bf16": Transformer.from_state_dict(config, state_dict, dtype=torch.bfloat16)}
    del state_dict
    variants["int8"] = quantize_model(copy.deepcopy(variants["bf16"]), "int8")
    for gs in (int(g) for g in args.group_sizes.split(",")):
        variants[f"int4 g{gs}"] = quantize_model(copy.deepcopy(variants["bf16"]), "int4", group_size=gs)
    ids = tokenizer.encode(haystack_text())[: args.positions + 1]
    stats = {name: {"agree": 0, "kl": 0.0, "agree_bf16": 0, "kl_bf16": 0.0, "seconds": 0.0} for name in variants}
    with torch.inference_mode():
        for start in range(0, args.positions, args.window):
            window = torch.tensor([ids[start: min(start + args.window, args.positions)]])
            ref_logp = reference(window)[0].float().log_softmax(-1)
            bf16_logp = None
            for name, model in variants.items():
                t = time.perf_counter()
                logp = model(window)[0].float().log_softmax(-1)
                stats[name]["seconds"] += time.perf_counter() - t
                bf16_logp = logp if bf16_logp is None else bf16_logp  # "bf16" comes first
                for suffix, ref in (("", ref_logp), ("_bf16", bf16_logp)):
                    stats[name]["agree" + suffix] += int((logp.argmax(-1) == ref.argmax(-1)).sum())
                    stats[name]["kl" + suffix] += float((ref.exp() * (ref - logp)).sum())
    print(f"{args.positions} positions of Wikipedia text, windows of {args.window}")
    print(f"{'variant':<12}{'vs float32: top-1':>18}{'mean KL':>10}{'vs bf16: top-1':>16}{'mean KL':>10}")
    result = {}
    for name, s in stats.items():
        n = args.positions
        result[name] = {"top1_agreement": s["agree"] / n, "mean_kl": s["kl"] / n,
                        "top1_agreement_vs_bf16": s["agree_bf16"] / n, "mean_kl_vs_bf16": s["kl_bf16"] / n}
        r = result[name]
        print(f"{name:<12}{100 * r['top1_agreement']:>17.2f}%{r['mean_kl']:>10.4f}"
              f"{100 * r['top1_agreement_vs_bf16']:>15.2f}%{r['mean_kl_vs_bf16']:>10.4f}")
    print(json.dumps({"positions": args.positions, "results": result}))


if __name__ == "__main__":
    main()
