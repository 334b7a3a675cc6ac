"""One training step, ours beside transformers (+ peft for LoRA), on the same config, data and batch.

    python bench/train_step.py [--steps 5] [--batch 4] [--seq 256] [--bf16] [--size 0.5b] [--json out.json]
        [--peer-keeps-freed-memory]

A Qwen2 of the real vocabulary (151,936 tokens) with a small body (hidden 256, 4 layers; --size 0.5b:
Qwen2-0.5B's shapes, random weights), float32
weights and compute in both (with --bf16: float32 weights, both steps under torch's bf16 autocast, as
`qwen2 train` runs where the CPU multiplies bf16 natively and HF's Trainer does with --bf16), AdamW,
full fine-tuning and LoRA rank 8 on every projection; AdamW fused in both (`qwen2 train`'s, and HF
Trainer's default optimizer since torch 2.8). Each
row runs in its own process so its peak RSS (VmHWM) is its own; two warm-up steps, then the
median step time of --steps. Ours sets the C allocator to reuse freed memory, as `qwen2 train` does
(qwen2.memory.keep_freed_memory); --peer-keeps-freed-memory sets it for transformers' rows too, to
show what of the difference is the allocator. Prints the configuration, a table with ratios, and
one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

CONFIG = dict(vocab_size=151936, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
              rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
QWEN2_0_5B = CONFIG | dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def time_steps(step, steps: int) -> float:
    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_ours(lora: bool, batch: int, seq: int, steps: int, bf16: bool, config: dict) -> dict:
    import torch

    from qwen2.config import Qwen2Config
    from qwen2.memory import keep_freed_memory
    from qwen2.model import Transformer
    from qwen2.train.data import Batch
    from qwen2.train.lm import initialize
    from qwen2.train.lora import add_lora
    from qwen2.train.loss import loss_sum

    keep_freed_memory()  # as the trainer does on a CPU
    torch.manual_seed(0)
    model = initialize(Transformer(Qwen2Config(**config))).train()
    if lora:
        add_lora(model, 8, 16)
    else:  # as `qwen2 train sft` does in one process: the tied embedding's own gradient sparse
        model.model.embed_tokens.sparse = True
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    tokens = torch.randint(0, CONFIG["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(1))
    targets = torch.cat([tokens[:, 1:], torch.full((batch, 1), -100)], 1)
    data = Batch(tokens, torch.arange(seq).expand(batch, seq), torch.zeros_like(tokens), targets,
                 (targets != -100).float())

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_sum(model, data) / (targets != -100).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return {"step_s": time_steps(step, steps)}


def run_transformers(lora: bool, batch: int, seq: int, steps: int, bf16: bool, config: dict) -> dict:
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**config)).train()
    if lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    tokens = torch.randint(0, CONFIG["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(1))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return {"step_s": time_steps(step, steps), "transformers": transformers.__version__}


def cpu_name() -> str:
    return next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                platform.processor())


def run_rows(script: str, peer: str, flags: list[str]) -> dict[str, dict]:
    """Rows full/ours, full/PEER, lora/ours, lora/PEER, each `script --child ENGINE` in its own
    process (so its peak RSS is its own); prints them and the ratios to the peer."""
    rows = {}
    for mode in ("full", "lora"):
        for who in ("ours", peer):
            cmd = [sys.executable, script, "--child", who, *flags] + (["--lora"] if mode == "lora" else [])
            done = subprocess.run(cmd, capture_output=True, text=True)
            rows[f"{mode}/{who}"] = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else \
                {"missing": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    print(f"{'mode':6} {'engine':13} {'tokens/s':>9} {'peak MiB':>9}")
    for name, r in rows.items():
        mode, who = name.split("/")
        speed, memory = r.get("tokens_per_s", float("nan")), r.get("peak_rss_mib", float("nan"))
        print(f"{mode:6} {who:13} {speed:9.0f} {memory:9.0f}")
    for mode in ("full", "lora"):
        ours, theirs = rows[f"{mode}/ours"], rows[f"{mode}/{peer}"]
        if "missing" not in ours and "missing" not in theirs:
            print(f"{mode}: ours {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x {peer}'s tokens/s at "
                  f"{ours['peak_rss_mib'] / theirs['peak_rss_mib']:.2f}x its peak memory")
    return rows


def child(args: argparse.Namespace) -> None:
    runner = run_ours if args.child == "ours" else run_transformers
    if args.child != "ours" and args.peer_keeps_freed_memory:
        from qwen2.memory import keep_freed_memory

        keep_freed_memory()
    config = QWEN2_0_5B if args.size == "0.5b" else CONFIG
    result = runner(args.lora, args.batch, args.seq, args.steps, args.bf16, config)
    result |= {"tokens_per_s": args.batch * args.seq / result["step_s"], "peak_rss_mib": peak_rss_mib()}
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--json")
    parser.add_argument("--child", choices=["ours", "transformers"])
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="both steps under bf16 autocast")
    parser.add_argument("--size", choices=["tiny", "0.5b"], default="tiny")
    parser.add_argument("--peer-keeps-freed-memory", action="store_true",
                        help="set transformers' process's allocator as ours is set")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    import torch

    cpu = cpu_name()
    compute = "bf16 autocast" if args.bf16 else "float32"
    config = QWEN2_0_5B if args.size == "0.5b" else CONFIG
    print(f"# {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}; batch {args.batch} x "
          f"{args.seq} tokens, {compute}, AdamW; config {config}")
    rows = run_rows(__file__, "transformers", ["--steps", str(args.steps), "--batch", str(args.batch),
                                               "--seq", str(args.seq), "--size", args.size]
                    + (["--bf16"] if args.bf16 else [])
                    + (["--peer-keeps-freed-memory"] if args.peer_keeps_freed_memory else []))
    report = {"cpu": cpu, "batch": args.batch, "seq": args.seq, "compute": compute, "config": config,
              "peer_keeps_freed_memory": args.peer_keeps_freed_memory, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
