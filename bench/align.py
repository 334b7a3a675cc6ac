"""Preference training on the default model (Qwen2.5-Coder-0.5B-Instruct, float32, LoRA) with
llamafactory's dpo_en_demo pairs: the numbers of bench/RESULTS.md's alignment section.

    python bench/align.py rm  [--pairs 40] [--steps 8]      # reward model: held-out accuracy before/after
    python bench/align.py dpo [--pairs 40] [--steps 10]     # DPO (OnDARE): held-out accuracy, margin over steps
    python bench/align.py tax [--pairs 40] [--steps 8] [--asdiv 10]   # AdamW vs OnDARE vs OnTIES

The first --pairs records of dpo_en_demo (in file order) whose prompt takes at most half of
--max-len tokens are used (replies are cut to fit); --heldout of them (seeded split) are held out.
Each run writes its output folder under --out and ends with one JSON line; dpo copies its
metrics plot to bench/align_dpo.png. tax also scores ASDiv accuracy (the first
--asdiv problems, greedy, qwen2/eval/asdiv.py) of the model before and after each optimizer.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def subset(n: int, max_len: int, folder: Path) -> Path:
    """The first n records of dpo_en_demo whose prompt takes at most half of max_len tokens (so the
    replies, cut to fit, keep at least the other half)."""
    from qwen2.train.datasets import data_path
    from qwen2.train.preference import prompt_messages, render_prompt
    from qwen2.weights import load_tokenizer

    tokenizer = load_tokenizer(None)
    records = []
    for record in json.loads(data_path("dpo_en_demo").read_text()):
        if len(render_prompt(tokenizer, prompt_messages(record))[1]) <= max_len // 2:
            records.append(record)
        if len(records) == n:
            break
    path = folder / f"dpo_en_demo_{n}_{max_len}.json"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return path


def cpu() -> str:
    try:
        info = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        name = platform.processor()
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    return f"{name}, load {' '.join(load)}"


def train(task: str, data: Path, out: Path, **settings) -> tuple[dict, list[dict], float]:
    from qwen2.train.align import AlignConfig
    from qwen2.train.align_cli import trainer_for

    config = AlignConfig(data=str(data), out=str(out), task=task, progress=False, **settings)
    start = time.perf_counter()
    trainer = trainer_for(config)
    print(f"{task}: {len(trainer.train_pairs)} train, {len(trainer.heldout_pairs)} held-out pairs", file=sys.stderr)
    last = trainer.train()
    seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return last, rows, seconds


def asdiv_accuracy(model_dir: Path | None, n: int) -> float:
    from qwen2.eval.asdiv import INSTRUCTION, is_correct, problems
    from qwen2.loading import load

    llm = load(str(model_dir) if model_dir else None, quant="none", dtype="float32", max_slots=4)
    items = problems()[:n]
    correct = 0
    for item in items:
        reply = llm.chat([{"role": "user", "content": INSTRUCTION.format(**item)}], temperature=0, max_tokens=256)
        correct += is_correct(reply.text, item["answer"])
    return correct / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["rm", "dpo", "tax"])
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--heldout", type=float, default=0.2)
    parser.add_argument("--max-len", type=int, default=160)
    parser.add_argument("--steps", type=int, help="default: rm 8, dpo 10, tax 8")
    parser.add_argument("--lr", type=float, help="default: rm 2e-4, dpo and tax 5e-4")
    parser.add_argument("--eval-every", type=int, help="default: rm 8, dpo 5")
    parser.add_argument("--asdiv", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("/tmp/qwen2-align-bench"))
    args = parser.parse_args()
    data = subset(args.pairs, args.max_len, args.out)
    steps = args.steps or {"rm": 8, "dpo": 10, "tax": 8}[args.what]
    args.eval_every = args.eval_every or {"rm": 8, "dpo": 5, "tax": 0}[args.what]
    lr = args.lr or (2e-4 if args.what == "rm" else 5e-4)
    common = dict(max_len=args.max_len, heldout=args.heldout, lora_rank=8, batch_size=2, seed=0, lr=lr,
                  on_bad_sample="skip")
    result: dict = {"bench": f"align-{args.what}", "cpu": cpu(), "pairs": args.pairs, "heldout": args.heldout}
    if args.what == "rm":
        last, rows, seconds = train("rm", data, args.out / "rm", steps=steps, eval_every=args.eval_every,
                                    center=0.01, **common)
        result |= {"steps": steps, "eval": [{k: r[k] for k in r if k == "step" or k.startswith("eval_")}
                                                 for r in rows if "eval_accuracy" in r]}
    elif args.what == "dpo":
        last, rows, seconds = train("dpo", data, args.out / "dpo", steps=steps, eval_every=args.eval_every,
                                    optimizer="ondare", reserve_rate=0.1, **common)
        shutil.copy(args.out / "dpo" / "metrics.png", ROOT / "bench" / "align_dpo.png")
        result |= {"steps": steps, "eval": [{k: r[k] for k in r if k == "step" or k.startswith("eval_")}
                                            for r in rows if "eval_accuracy" in r]}
    else:
        before = asdiv_accuracy(None, args.asdiv)
        result |= {"asdiv_before": before, "runs": {}}
        for optimizer in ("adamw", "ondare", "onties"):
            out = args.out / f"tax-{optimizer}"
            last, rows, seconds = train("dpo", data, out, steps=steps, optimizer=optimizer, reserve_rate=0.1,
                                        **common)
            result["runs"][optimizer] = {"accuracy_before": rows[0]["eval_accuracy"],
                                         "accuracy_after": last["eval_accuracy"], "margin_after": last["eval_margin"],
                                         "asdiv_after": asdiv_accuracy(out, args.asdiv), "seconds": round(seconds)}
        seconds = 0.0
    result["seconds"] = round(seconds)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
