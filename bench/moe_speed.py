"""MoE speed on the CPU: the upcycled default model (bench/upcycle_moe.py: 48 experts, top-8)
through our engine beside transformers' Qwen2-MoE on the same folder, and the dense default model
beside both, in one run.

    python bench/moe_speed.py FOLDER [--prompt 128] [--new 32] [--threads N] [--out moe.json]

Rows: prefill of a --prompt-token prompt and batch-1 greedy decode of --new tokens, each timed
alone (the decode time is generate's total less its prefill). Ours in float32 (grouped experts,
transformers' oracle dtype), ours on Q8_0 blocks made at load (the CPU default for an HF folder),
with --gguf the folder's GGUF on its own blocks, transformers in float32. `greedy_tokens_equal`
says whether ours in float32 and transformers chose the same tokens.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time

import torch

from qwen2.bench.machine import cpu_model
from qwen2.engine.sampling import SamplingParams
from qwen2.loading import load


def ours(folder: str, quant: str, prompt: list[int], new: int) -> dict:
    llm = load(folder, quant=quant, dtype="float32" if quant == "none" else "auto", ctx=len(prompt) + new + 8,
               prefill_chunk=len(prompt))

    def run(tokens: int) -> tuple[float, list[int]]:
        llm.engine.clear_prefix_cache()
        start = time.perf_counter()
        out = llm.engine.run_all([prompt], [SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)])
        return time.perf_counter() - start, out[0][0].output

    run(2)  # warm-up
    prefill, _ = run(1)
    total, tokens = run(new)
    return {"quant": llm.quant, "prefill_tok_s": len(prompt) / prefill, "decode_tok_s": (new - 1) / (total - prefill),
            "tokens": tokens}


def theirs(folder: str, prompt: list[int], new: int) -> dict:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])

    def run(tokens: int) -> tuple[float, list[int]]:
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        return time.perf_counter() - start, out[0, len(prompt):].tolist()

    run(2)
    prefill, _ = run(1)
    total, tokens = run(new)
    return {"prefill_tok_s": len(prompt) / prefill, "decode_tok_s": (new - 1) / (total - prefill), "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="the upcycled MoE folder (bench/upcycle_moe.py)")
    parser.add_argument("--gguf", help="the folder converted to GGUF (qwen2 convert FOLDER out.gguf --type q4_k): "
                        "its own blocks, the CPU default for a quantized MoE file")
    parser.add_argument("--dense", default="qwen2.5-coder-0.5b-instruct", help="the dense model beside it")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prompt = torch.randint(1000, 30000, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    report = {"cpu": cpu_model(), "machine": platform.machine(), "threads": args.threads, "prompt": args.prompt,
              "new": args.new, "rows": {}}
    runs = [("moe/ours float32", lambda: ours(args.folder, "none", prompt, args.new)),
            ("moe/ours q8_0", lambda: ours(args.folder, "auto", prompt, args.new)),
            *([("moe/ours gguf", lambda: ours(args.gguf, "auto", prompt, args.new))] if args.gguf else []),
            ("moe/transformers float32", lambda: theirs(args.folder, prompt, args.new)),
            ("dense/ours float32", lambda: ours(args.dense, "none", prompt, args.new))]
    for name, run in runs:
        report["rows"][name] = run()
        gc.collect()
        row = report["rows"][name]
        print(f"{name:28s} prefill {row['prefill_tok_s']:8.1f} tok/s   decode {row['decode_tok_s']:6.2f} tok/s",
              flush=True)
    rows = report["rows"]
    report["moe_decode_ours_over_transformers"] = rows["moe/ours float32"]["decode_tok_s"] / rows[
        "moe/transformers float32"]["decode_tok_s"]
    report["moe_prefill_ours_over_transformers"] = rows["moe/ours float32"]["prefill_tok_s"] / rows[
        "moe/transformers float32"]["prefill_tok_s"]
    report["greedy_tokens_equal"] = rows["moe/ours float32"]["tokens"] == rows["moe/transformers float32"]["tokens"]
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
