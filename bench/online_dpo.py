"""Online DPO on the default model with the verifier reward: instruction following, before and after.

    python bench/online_dpo.py [--prompts 120] [--steps 60] [--samples 4] [--no-end-penalty 1] [--eval 120]
        [--out /tmp/qwen2-online-dpo]

The policy (Qwen2.5-Coder-0.5B-Instruct dequantized to float32, LoRA r8) samples --samples replies to
each prompt of the ifeval training split (alpaca tasks with drawn constraints, qwen2.eval.ifeval's
"train" tasks), the verifier scores each reply by the share of its constraints met, and the best and
the worst reply form each step's DPO pair. The held-out score is `qwen2 eval ifeval` on the first
--eval prompts of the eval split, whose tasks the training prompts never use, run on the model before
and on the merged model after, both in bf16 with the same settings; `qwen2 eval compare` gives the
paired difference with its interval. Steps already done are not redone: a finished run's folder and
an eval's --json file are reused. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.align import cpu  # noqa: E402


def ifeval(model: str | None, out: Path, limit: int, max_tokens: int) -> dict:
    """The eval's summary (its --json file is kept, so a rerun resumes)."""
    command = [sys.executable, "-m", "qwen2", "eval", "ifeval", "--limit", str(limit), "--max-tokens", str(max_tokens),
               "--quant", "none", "--dtype", "bfloat16", "--max-concurrency", "16", "--json", str(out)]
    subprocess.run(command + (["--model", model] if model else []), check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())["summary"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=120, help="training prompts (the first of the train split)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=2, help="prompts per step")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--max-new-tokens", type=int, default=192)
    parser.add_argument("--no-end-penalty", type=float, default=1.0, help="taken from the reward of a reply cut off")
    parser.add_argument("--eval", type=int, default=120, help="held-out ifeval prompts (eval split)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/qwen2-online-dpo"))
    args = parser.parse_args()
    from qwen2.eval.ifeval import prompt_set
    from qwen2.train.config import TrainConfig
    from qwen2.train.trainer import Trainer

    args.out.mkdir(parents=True, exist_ok=True)
    prompts = args.out / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": item["task"], "constraints": item["constraints"]}) + "\n"
                               for item in prompt_set("train", 0)[: args.prompts]))
    result: dict = {"bench": "online-dpo-verifier", "cpu": cpu(), **{k: v for k, v in vars(args).items() if k != "out"}}
    before = ifeval(None, args.out / "ifeval_before.json", args.eval, args.max_new_tokens)
    run = args.out / "run"
    start = time.perf_counter()
    if not (run / "model.safetensors").exists():
        config = TrainConfig.from_flat(dict(
            data=str(prompts), out=str(run), task="online-dpo", reward="verifier", lora_rank=8, lr=args.lr,
            steps=args.steps, batch_size=args.batch_size, samples=args.samples, max_new_tokens=args.max_new_tokens,
            no_end_penalty=args.no_end_penalty,
            temperature=0.8, max_len=512, heldout=0.1, eval_every=max(1, args.steps // 3), seed=0, progress=False))
        Trainer(config).train()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    after = ifeval(str(run), args.out / "ifeval_after.json", args.eval, args.max_new_tokens)
    subprocess.run([sys.executable, "-m", "qwen2", "eval", "compare", str(args.out / "ifeval_before.json"),
                    str(args.out / "ifeval_after.json"), "--json", str(args.out / "compare.json")], check=True,
                   stdout=subprocess.DEVNULL)
    result |= {"train_seconds": round(time.perf_counter() - start), "before": before, "after": after,
               "compare": json.loads((args.out / "compare.json").read_text()),
               "curve": [{k: r[k] for k in r if k == "step" or k.startswith("eval_") or k in
                          ("sample_reward", "paired")} for r in rows if "eval_reward" in r or "sample_reward" in r]}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
