"""Preference training on the default model (Qwen2.5-Coder-0.5B-Instruct, float32, LoRA) with
llamafactory's dpo_en_demo pairs: the numbers of bench/RESULTS.md's alignment section.

    python bench/align.py rm  [--steps 60] [--data PAIRS]   # reward model: held-out accuracy before/after
    python bench/align.py tax [--steps 100] [--asdiv 60]    # DPO with AdamW vs OnDARE vs OnTIES: the alignment tax
    python bench/align.py tau [--steps 60] [--sft-steps 40] # the same, full fine-tuning with a real SFT delta tau

The records of dpo_en_demo (rm: or of --data, e.g. the pairs.jsonl of `qwen2 data instruct-feedback`)
whose prompt takes at most half of --max-len tokens are used (--max-prompt-len, as the README's
example; replies are cut to fit); --heldout of them (seeded split) are held out. Each run writes
its output folder under --out and ends with one JSON line.
tax's OnDARE run is the README's `qwen2 train dpo` example; its metrics plot is copied to
bench/align_dpo.png. tax also scores ASDiv accuracy (the first
--asdiv problems, greedy chain of thought, qwen2/eval/asdiv.py, batched) of the model before and
after each optimizer; a run whose folder already holds a finished model is not trained again, and
ASDiv answers are kept beside each model (asdiv.jsonl), so a rerun after a kill redoes neither.
tau first fine-tunes every weight of the default model on --sft-data (alpaca_en_demo, or e.g. the
sft.jsonl of a `qwen2 data` command; the SFT stage: base = the default model, SFT = its output,
tau = SFT - base), then runs DPO from the SFT model with each optimizer, the merging ones given
--base so they merge tau back in (alpha per --merge-alpha); the capability before is the SFT model's.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cpu() -> str:
    try:
        info = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        name = platform.processor()
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    return f"{name}, load {' '.join(load)}"


def train(task: str, out: Path, data: str = "dpo_en_demo", **settings) -> tuple[dict, list[dict], float]:
    from qwen2.train.config import TrainConfig
    from qwen2.train.trainer import Trainer

    config = TrainConfig.from_flat(dict(data=data, out=str(out), task=task, progress=False, **settings))
    start = time.perf_counter()
    trainer = Trainer(config)
    print(f"{task}: {len(trainer.task.train_data)} train, {len(trainer.task.heldout)} held-out pairs", file=sys.stderr)
    last = trainer.train()
    seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return last, rows, seconds


def asdiv_accuracy(model_dir: Path | None, n: int, record: Path) -> tuple[float, float]:
    """(accuracy on the first n ASDiv problems, seconds): float32, greedy, 16 at a time. Each
    answer is kept in `record` (.jsonl), so a rerun after a kill scores only what is missing."""
    from qwen2.eval import asdiv
    from qwen2.eval.harness import Results
    from qwen2.loading import load

    start = time.perf_counter()
    problems = asdiv.problems()[:n]
    results = Results("asdiv", {"model": str(model_dir or "default")}, record)
    if any(p["id"] not in results for p in problems):
        llm = load(str(model_dir) if model_dir else None, quant="none", dtype="float32", max_concurrency=16)
        asdiv.run(llm, problems, results, max_tokens=256)
        del llm
        gc.collect()  # the engine's model sits in reference cycles: without this, each scored model stays resident
    records = results.ordered(p["id"] for p in problems)
    return asdiv.summarize(records)["accuracy"] / 100, time.perf_counter() - start


def sft(out: Path, data: str, steps: int, max_len: int) -> float:
    """Full fine-tuning of the default model on `data`; seconds (0 when already done)."""
    from qwen2.train.config import TrainConfig
    from qwen2.train.trainer import Trainer

    if (out / "model.safetensors").exists():
        return 0.0
    start = time.perf_counter()
    Trainer(TrainConfig.from_flat(dict(data=data, out=str(out), steps=steps, batch_size=2, max_len=max_len,
                                       lr=1e-5, on_bad_sample="skip", save_every=0, progress=False))).train()
    return time.perf_counter() - start


def optimizer_runs(args: argparse.Namespace, prefix: str, steps: int, before: float, common: dict,
                   **merging) -> dict:
    """DPO with AdamW, OnDARE and OnTIES at equal steps (`merging` settings for the latter two):
    held-out curves and ASDiv after each. A run whose folder holds a finished model is not redone."""
    runs = {}
    for optimizer in ("adamw", "ondare", "onties"):
        out = args.out / f"{prefix}-{optimizer}"
        if not (out / "model.safetensors").exists():
            train("dpo", out, steps=steps, eval_every=args.eval_every, optimizer=optimizer, reserve_rate=0.1,
                  **common, **(merging if optimizer != "adamw" else {}))
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in rows if "eval_accuracy" in r]
        after, _ = asdiv_accuracy(out, args.asdiv, out / "asdiv.json")
        runs[optimizer] = {"eval": [{k: r[k] for k in r if k == "step" or k.startswith("eval_")} for r in evals],
                           "train_seconds": rows[-1]["elapsed"], "asdiv_after": after,
                           "asdiv_change": round(after - before, 4)}
        print(json.dumps({optimizer: runs[optimizer]}), file=sys.stderr)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["rm", "tax", "tau"])
    parser.add_argument("--data", default="dpo_en_demo", help="rm: the pairs (e.g. a `qwen2 data ...` pairs.jsonl)")
    parser.add_argument("--heldout", type=float, default=0.25)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--steps", type=int, help="default: rm 60, tax 100, tau 60")
    parser.add_argument("--lr", type=float, help="default: rm 2e-4, tax 5e-4, tau 5e-6 (full fine-tuning)")
    parser.add_argument("--sft-steps", type=int, default=40, help="tau: steps of the SFT stage")
    parser.add_argument("--sft-data", default="alpaca_en_demo", help="tau: the SFT stage's data")
    parser.add_argument("--merge-alpha", type=float, default=1e-7, help="tau: weight of tau in each merge")
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--asdiv", type=int, default=60)
    parser.add_argument("--out", type=Path, default=Path("/tmp/qwen2-align-bench"))
    args = parser.parse_args()
    steps = args.steps or {"rm": 60, "tax": 100, "tau": 60}[args.what]
    lr = args.lr or {"rm": 2e-4, "tax": 5e-4, "tau": 5e-6}[args.what]
    common = dict(max_len=args.max_len, max_prompt_len=args.max_len // 2, heldout=args.heldout,
                  lora_rank=0 if args.what == "tau" else 8, batch_size=2, seed=0, lr=lr, on_bad_sample="skip")
    result: dict = {"bench": f"align-{args.what}", "cpu": cpu(), "heldout": args.heldout, "lr": lr}
    if args.what == "rm":
        result["data"] = args.data
    if args.what == "rm":
        last, rows, seconds = train("rm", args.out / "rm", data=args.data, steps=steps, eval_every=args.eval_every,
                                    center=0.01, **common)
        result |= {"steps": steps, "eval": [{k: r[k] for k in r if k == "step" or k.startswith("eval_")}
                                                 for r in rows if "eval_accuracy" in r]}
    elif args.what == "tau":
        from qwen2.weights.default import DEFAULT_NAME

        sft_dir = args.out / "tau-sft"
        sft_seconds = sft(sft_dir, args.sft_data, args.sft_steps, args.max_len)
        base_score, _ = asdiv_accuracy(None, args.asdiv, args.out / "asdiv-base.json")
        before, _ = asdiv_accuracy(sft_dir, args.asdiv, sft_dir / "asdiv.json")
        result |= {"steps": steps, "lr": lr, "sft_data": args.sft_data, "sft_steps": args.sft_steps,
                   "sft_seconds": round(sft_seconds),
                   "merge_alpha": args.merge_alpha, "asdiv_problems": args.asdiv, "asdiv_base": base_score,
                   "asdiv_before": before,
                   "runs": optimizer_runs(args, "tau", steps, before, {**common, "model": str(sft_dir)},
                                          base=DEFAULT_NAME, merge_alpha=args.merge_alpha)}
        seconds = 0.0
    else:
        before, asdiv_seconds = asdiv_accuracy(None, args.asdiv, args.out / "asdiv-base.json")
        result |= {"steps": steps, "asdiv_problems": args.asdiv, "asdiv_before": before,
                   "asdiv_seconds": round(asdiv_seconds), "runs": optimizer_runs(args, "tax", steps, before, common)}
        shutil.copy(args.out / "tax-ondare" / "metrics.png", ROOT / "bench" / "align_dpo.png")
        seconds = 0.0
    result["seconds"] = round(seconds)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
