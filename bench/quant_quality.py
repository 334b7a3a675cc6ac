"""How much weight-only quantization changes the default model's predictions on real text.

    python bench/quant_quality.py [--positions 2000] [--window 500] [--group-sizes 128,64,32]
                                  [--variants gguf,gguf-decode,gguf-f32,llama.cpp,...]

Reference: the GGUF dequantized to float32. For bf16 (no quantization), int8 and int4 at
each group size we report top-1 agreement with the reference and the mean KL(reference ||
variant) over the next-token distributions at every position of Wikipedia text (windows of
--window tokens); and the same against the bf16 model, which isolates what the weight
quantization adds to bf16 activations.

The default path (`--quant auto` on a GGUF: the file's own blocks through our integer kernels,
activations rounded to int8 per 32) is the "gguf" row for a window computed in one pass (the
many-row path: bf16 products on bf16 hardware, our AMX tiles or GEMMs on dequantized weights) and
"gguf-decode" for the same positions fed one token at a time through a KV cache (the int8 kernel,
as a reply's tokens are);
"gguf-f32" is the exact mode (float32 activations), "gguf A8" simulates int8 activations on the
exact mode, and "llama.cpp" is llama-cpp-python's logits for the same windows of the same file
(every position's logits from one llama_decode per window), the peer beside us.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from qwen2.eval.data import haystack_text
from qwen2.loading import load_model
from qwen2.model import Transformer
from qwen2.quant.blocks import BlockLinear
from qwen2.quant.int_linear import quantize_model
from qwen2.weights import load_checkpoint, resolve_model


def int8_per_block(x: torch.Tensor) -> torch.Tensor:
    """x rounded as llama.cpp's Q8_0 activations: blocks of 32, symmetric int8, scale max|x| / 127."""
    blocks = x.float().reshape(*x.shape[:-1], -1, 32)
    scale = blocks.abs().amax(-1, keepdim=True).clamp(min=1e-30) / 127
    return (torch.round(blocks / scale) * scale).reshape(x.shape).to(x.dtype)


class OneTokenAtATime:
    """A window's logits from feeding its tokens one by one through a KV cache (decode steps)."""

    def __init__(self, model: Transformer):
        self.model = model

    def __call__(self, window: torch.Tensor) -> torch.Tensor:
        from qwen2.model import KVCache

        n = window.shape[1]
        cache = KVCache(self.model.config, 1, n)
        rows = [self.model(window[:, i: i + 1], torch.tensor([[i]]), cache=cache)[0, -1] for i in range(n)]
        return torch.stack(rows)[None]


class LlamaCpp:
    """llama-cpp-python on the same file: every position's logits of a window from one evaluation."""

    def __init__(self, path, window: int):  # noqa: ANN001
        import llama_cpp

        self.llm = llama_cpp.Llama(str(path), n_ctx=window + 8, n_batch=window + 8, n_ubatch=window + 8,
                                   logits_all=True, n_threads=torch.get_num_threads(), verbose=False)

    def __call__(self, window: torch.Tensor) -> torch.Tensor:
        import numpy as np

        self.llm.reset()
        self.llm.eval(window[0].tolist())
        return torch.from_numpy(np.array(self.llm.scores[: window.shape[1]], dtype=np.float32))[None]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--positions", type=int, default=2000)
    ap.add_argument("--window", type=int, default=500)
    ap.add_argument("--group-sizes", default="128,64,32", help="int4 group sizes to compare")
    ap.add_argument("--variants", help="comma-separated subset of the rows (default: all that apply)")
    args = ap.parse_args()

    config, state_dict, tokenizer = load_checkpoint(args.model, dtype=torch.float32)
    reference = Transformer.from_state_dict(config, state_dict)
    # what `load()` runs on a CPU with native bf16: bf16 activations, float or quantized weights
    bf16 = Transformer.from_state_dict(config, state_dict, dtype=torch.bfloat16)
    del state_dict

    # Built one at a time (all at once need ~10 GB): each a function of nothing, returning the model.
    def with_a8(model: torch.nn.Module) -> torch.nn.Module:
        for layer in model.modules():
            if isinstance(layer, BlockLinear):
                layer.register_forward_pre_hook(lambda _, args: (int8_per_block(args[0]),))
        return model

    variants = {"bf16": lambda: bf16, "int8": lambda: quantize_model(copy.deepcopy(bf16), "int8")}
    for gs in (int(g) for g in args.group_sizes.split(",")):
        variants[f"int4 g{gs}"] = lambda gs=gs: quantize_model(copy.deepcopy(bf16), "int4", group_size=gs)
    path = resolve_model(args.model)
    if path.is_file():
        variants["gguf"] = lambda: load_model(args.model, quant="gguf")[0]
        variants["gguf-decode"] = lambda: OneTokenAtATime(load_model(args.model, quant="gguf")[0])
        variants["gguf-f32"] = lambda: load_model(args.model, quant="gguf-f32")[0]
        variants["gguf bf16"] = lambda: load_model(args.model, quant="gguf-f32", dtype="bfloat16")[0]
        variants["gguf A8"] = lambda: with_a8(load_model(args.model, quant="gguf-f32")[0])
        variants["llama.cpp"] = lambda: LlamaCpp(path, args.window)
    if args.variants:
        variants = {k: v for k, v in variants.items() if k in args.variants.split(",")}
    ids = tokenizer.encode(haystack_text())[: args.positions + 1]
    starts = range(0, args.positions, args.window)
    windows = [torch.tensor([ids[s: min(s + args.window, args.positions)]]) for s in starts]
    stats = {name: {"agree": 0, "kl": 0.0, "agree_bf16": 0, "kl_bf16": 0.0, "seconds": 0.0} for name in variants}
    for name, build in variants.items():
        model = build()  # outside inference mode: the loader's worker threads would not be in it
        with torch.inference_mode():
            for window in windows:
                t = time.perf_counter()
                logp = model(window)[0].float().log_softmax(-1)
                stats[name]["seconds"] += time.perf_counter() - t
                for suffix, ref_model in (("", reference), ("_bf16", bf16)):
                    ref = ref_model(window)[0].float().log_softmax(-1)
                    stats[name]["agree" + suffix] += int((logp.argmax(-1) == ref.argmax(-1)).sum())
                    stats[name]["kl" + suffix] += float((ref.exp() * (ref - logp)).sum())
        del model
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
