"""One DPO step, ours beside TRL's DPOTrainer, on the same tiny config, pairs and batch.

    python bench/dpo_step.py [--steps 5] [--batch 4] [--prompt 64] [--reply 192] [--json out.json]

A Qwen2 of the real vocabulary (151,936 tokens) with a small body (hidden 256, 4 layers, as
bench/train_step.py), float32 weights and compute in both, AdamW, sigmoid loss with beta 0.1, the
reference log-probabilities computed live each step (full fine-tuning: a frozen copy; LoRA rank 8
on every projection: the adapters switched off). Each pair is a --prompt token prompt with a chosen
and a rejected reply of --reply tokens (ending on the end token), the same ids for both. Ours is
the computation qwen2/train/dpo.py's trainer runs (pair_batch, sequence_logps, dpo_loss, lora_off);
TRL's is its DPOTrainer.train(), timed by a callback. Each row runs in its own process so its peak
RSS (VmHWM) is its own; two warm-up steps, then the median of --steps. Tokens are those of the
chosen and rejected sequences (prompt included), per second.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_step import CONFIG, TARGETS, cpu_name, peak_rss_mib, run_rows  # noqa: E402

WARMUP = 2


def pair_ids(encode, eos: int, prompt: int, reply: int) -> tuple[list[int], list[int], list[int]]:
    """Prompt, chosen and rejected token ids of the given lengths, the replies ending on `eos`."""
    def ids(word: str, n: int) -> list[int]:
        one = encode(word)
        assert len(one) == 1, (word, one)
        return one * n
    return ids(" hello", prompt), ids(" world", reply - 1) + [eos], ids(" there", reply - 1) + [eos]


def run_ours(lora: bool, batch: int, prompt: int, reply: int, steps: int) -> dict:
    import torch

    from qwen2.config import Qwen2Config
    from qwen2.model import Transformer
    from qwen2.train.dpo import dpo_loss, lora_off
    from qwen2.train.lm import initialize
    from qwen2.train.logprobs import sequence_logps
    from qwen2.train.lora import add_lora
    from qwen2.train.preference import Pair, pair_batch
    from qwen2.weights import load_tokenizer

    torch.manual_seed(0)
    model = initialize(Transformer(Qwen2Config(**CONFIG))).train()
    ref = None
    if lora:
        add_lora(model, 8, 16)
    else:
        ref = copy.deepcopy(model).eval().requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    tokenizer = load_tokenizer(None)
    p, c, r = pair_ids(tokenizer.encode, tokenizer.eos_token_ids[0], prompt, reply)
    pairs = [Pair(p, c, r, "bench", index=i) for i in range(batch)]
    tensors = pair_batch(pairs, 0)[:4]
    rss_setup = peak_rss_mib()

    def step():
        with torch.no_grad():
            if ref is not None:
                ref_sums, _ = sequence_logps(ref, *tensors)
            else:
                model.eval()
                with lora_off(model):
                    ref_sums, _ = sequence_logps(model, *tensors)
                model.train()
        sums, _ = sequence_logps(model, *tensors)
        loss = dpo_loss(sums[:batch], sums[batch:], ref_sums[:batch], ref_sums[batch:], 0.1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = []
    for i in range(WARMUP + steps):
        start = time.perf_counter()
        step()
        if i >= WARMUP:
            times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times), "rss_after_setup_mib": rss_setup}


def run_trl(lora: bool, batch: int, prompt: int, reply: int, steps: int) -> dict:
    import datasets
    import torch
    import transformers
    import trl

    from qwen2.weights import load_tokenizer

    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**CONFIG))
    with tempfile.TemporaryDirectory() as folder:
        load_tokenizer(None).save(folder)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    p, c, r = pair_ids(lambda word: tokenizer.encode(word, add_special_tokens=False), tokenizer.eos_token_id,
                       prompt, reply)
    text = {"prompt": tokenizer.decode(p), "chosen": tokenizer.decode(c), "rejected": tokenizer.decode(r)}
    data = datasets.Dataset.from_list([text] * batch * (WARMUP + steps))
    peft_config = None
    if lora:
        import peft

        peft_config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM")
    times: list[float] = []

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

    with tempfile.TemporaryDirectory() as out:
        args = trl.DPOConfig(output_dir=out, per_device_train_batch_size=batch, max_steps=WARMUP + steps,
                             learning_rate=1e-4, beta=0.1, loss_type=["sigmoid"], max_length=prompt + reply,
                             use_cpu=True, bf16=False, report_to="none", save_strategy="no", logging_strategy="no",
                             dataloader_num_workers=0, lr_scheduler_type="constant", warmup_steps=0)
        ref = None if lora else copy.deepcopy(model)  # a model built in memory has no path TRL could reload
        trainer = trl.DPOTrainer(model, ref_model=ref, args=args, train_dataset=data, processing_class=tokenizer,
                                 peft_config=peft_config, callbacks=[StepTimer()])
        first = trainer.train_dataset[0]
        got = (len(first["prompt_ids"]), len(first["chosen_ids"]), len(first["rejected_ids"]))
        if got != (prompt, reply, reply):
            raise SystemExit(f"TRL tokenized the pair to {got} tokens, not {(prompt, reply, reply)}")
        rss_setup = peak_rss_mib()
        trainer.train()
    return {"step_s": statistics.median(times[WARMUP:]), "rss_after_setup_mib": rss_setup, "trl": trl.__version__,
            "transformers": transformers.__version__}


def child(args: argparse.Namespace) -> None:
    runner = run_ours if args.child == "ours" else run_trl
    result = runner(args.lora, args.batch, args.prompt, args.reply, args.steps)
    tokens = 2 * args.batch * (args.prompt + args.reply)
    result |= {"tokens_per_s": tokens / result["step_s"], "peak_rss_mib": peak_rss_mib()}
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--reply", type=int, default=192)
    parser.add_argument("--json")
    parser.add_argument("--child", choices=["ours", "trl"])
    parser.add_argument("--lora", action="store_true")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    import torch

    cpu = cpu_name()
    print(f"# {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}; {args.batch} pairs of "
          f"{args.prompt} + {args.reply} tokens, float32, AdamW, live reference; config {CONFIG}")
    rows = run_rows(__file__, "trl", ["--steps", str(args.steps), "--batch", str(args.batch), "--prompt",
                                      str(args.prompt), "--reply", str(args.reply)])
    report = {"cpu": cpu, "batch": args.batch, "prompt": args.prompt, "reply": args.reply, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
