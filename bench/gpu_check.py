"""CUDA check in one run: correctness on tiny configs against the CPU, then speed at real sizes on
random weights (no checkpoint can travel to a lent GPU machine).

    python bench/gpu_check.py [--out results.json] [--small]     # --small: tiny sizes
    python bench/gpu_check.py --dry                                # no GPU: every step on the CPU, tiny sizes

--dry (automatic without CUDA) runs the whole script on the CPU at tiny sizes, so CI checks it
end to end: the checks that need no second device (cached decode vs a full forward, the fused
loss and its gradients) must pass, and the speed steps run for shape only (their numbers mean
nothing). The exit status is 1 when a correctness check fails.

Correctness: logits CPU vs CUDA (float32), cached decode vs a full forward, the fused training
loss and its gradients vs autograd through full logits, one training step's loss CPU vs CUDA.
Speed: one training step of the Qwen2-0.5B config (float32 master weights, bf16 autocast, AdamW;
full and LoRA rank 8) beside transformers (+ peft when installed); batch-1 greedy decode of the
Qwen2-7B config in bf16 after a 512-token prompt, ours (the model with its KV cache, no engine)
beside transformers' generate, with the bandwidth that implies.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from qwen2.config import Qwen2Config
from qwen2.model import KVCache, Transformer
from qwen2.train.data import Batch
from qwen2.train.lora import add_lora
from qwen2.train.loss import LinearCrossEntropy, loss_sum

TINY = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=True)


def batch_of(tokens: torch.Tensor) -> Batch:
    b, t = tokens.shape
    targets = torch.cat([tokens[:, 1:], torch.full((b, 1), -100, device=tokens.device)], 1)
    return Batch(tokens, torch.arange(t, device=tokens.device).expand(b, t), torch.zeros_like(tokens), targets,
                 (targets != -100).float())


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def free_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()


def correctness(device: str) -> dict:
    """The CPU model against the same weights on `device` (itself in a dry run: those diffs are 0)."""
    torch.manual_seed(0)
    cpu = Transformer(Qwen2Config(**TINY)).eval()
    gpu = Transformer(Qwen2Config(**TINY)).to(device).eval()
    gpu.load_state_dict(cpu.state_dict())
    ids = torch.randint(0, 1024, (2, 100))
    out = {}
    with torch.no_grad():
        a, b = cpu(ids), gpu(ids.to(device)).cpu()
        out["logits_max_abs_diff"] = float((a - b).abs().max())
        cache = KVCache(gpu.config, 1, 128, device=device)
        gpu(ids[:1, :99].to(device), cache=cache)
        step = gpu(ids[:1, 99:].to(device), torch.tensor([[99]], device=device), cache=cache)[0, -1]
        out["cached_decode_max_abs_diff"] = float((step.cpu() - b[0, -1]).abs().max())
    hidden = torch.randn(300, 64, device=device, requires_grad=True)
    head = torch.randn(1024, 64, device=device, requires_grad=True)
    targets = torch.randint(0, 1024, (300,), device=device)
    targets[::4] = -100
    weights = torch.rand(300, device=device)
    ours = LinearCrossEntropy.apply(hidden, head, targets, weights)
    ours.backward()
    grads = hidden.grad.clone(), head.grad.clone()
    hidden.grad = head.grad = None
    ref = (torch.nn.functional.cross_entropy(hidden @ head.T, targets, ignore_index=-100, reduction="none")
           * weights).sum()
    ref.backward()
    out["fused_loss_rel_diff"] = float((abs(ours - ref) / ref).detach())
    out["fused_grad_max_abs_diff"] = max(float((grads[0] - hidden.grad).abs().max()),
                                         float((grads[1] - head.grad).abs().max()))
    cpu.train()
    gpu.train()
    loss_cpu = loss_sum(cpu, batch_of(ids)).item()
    loss_gpu = loss_sum(gpu, batch_of(ids.to(device))).item()
    out["train_loss_rel_diff"] = abs(loss_cpu - loss_gpu) / loss_cpu
    out["ok"] = (out["logits_max_abs_diff"] < 1e-3 and out["cached_decode_max_abs_diff"] < 1e-3
                 and out["fused_loss_rel_diff"] < 1e-4 and out["train_loss_rel_diff"] < 1e-4)
    return out


def timed(step, steps: int, device: str) -> float:
    for _ in range(2):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - start) / steps


def ours_train(config: dict, tokens: torch.Tensor, lora: bool, steps: int) -> dict:
    device = tokens.device.type
    torch.manual_seed(0)
    reset_peak(device)
    with torch.device(device):
        model = Transformer(Qwen2Config(**config)).train()
    if lora:
        add_lora(model, 8, 16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    data = batch_of(tokens)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = loss_sum(model, data) / data.target_tokens
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = timed(step, steps, device)
    return {"tokens_per_s": tokens.numel() / seconds, "peak_gib": peak_gib(device)}


def their_train(config: dict, tokens: torch.Tensor, lora: bool, steps: int) -> dict:
    import transformers

    device = tokens.device.type
    torch.manual_seed(0)
    reset_peak(device)
    with torch.device(device):
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**config)).train()
    if lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = timed(step, steps, device)
    return {"tokens_per_s": tokens.numel() / seconds, "peak_gib": peak_gib(device)}


def train_speed(config: dict, batch: int, seq: int, steps: int, device: str) -> dict:
    rows = {}
    tokens = torch.randint(0, config["vocab_size"], (batch, seq), device=device)
    for lora in (False, True):
        mode = "lora" if lora else "full"
        rows[f"{mode}/ours"] = ours_train(config, tokens, lora, steps)
        free_memory(device)
        try:
            rows[f"{mode}/transformers"] = their_train(config, tokens, lora, steps)
        except ImportError as e:
            rows[f"{mode}/transformers"] = {"missing": str(e)}
        free_memory(device)
    return rows


def decode_speed(config: dict, prompt: int, new: int, device: str) -> dict:
    torch.manual_seed(0)
    out = {}
    with torch.device(device):
        model = Transformer(Qwen2Config(**config)).to(torch.bfloat16).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.randint(0, config["vocab_size"], (1, prompt), device=device)
    cache = KVCache(model.config, 1, prompt + new + 1, dtype=torch.bfloat16, device=device)
    with torch.no_grad():
        model(ids, cache=cache)
        token = ids[:, -1:]
        sync(device)
        start = time.perf_counter()
        for i in range(new):
            logits = model(token, torch.tensor([[prompt + i]], device=device), cache=cache)
            token = logits[:, -1].argmax(-1, keepdim=True)
        sync(device)
    seconds = (time.perf_counter() - start) / new
    out["ours"] = {"ms_per_token": seconds * 1e3, "tokens_per_s": 1 / seconds,
                   "weight_gbs": weight_bytes / seconds / 1e9}
    del model, cache
    free_memory(device)
    try:
        import transformers

        torch.set_default_dtype(torch.bfloat16)
        with torch.device(device):
            theirs = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**config)).eval()
        torch.set_default_dtype(torch.float32)
        with torch.no_grad():
            theirs.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
            sync(device)
            start = time.perf_counter()
            theirs.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
            sync(device)
        seconds = (time.perf_counter() - start) / new  # prefill included: an upper bound on their per-token time
        out["transformers"] = {"ms_per_token": seconds * 1e3, "tokens_per_s": 1 / seconds,
                               "note": "generate() timed whole, prompt included"}
    except ImportError as e:
        out["transformers"] = {"missing": str(e)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out")
    parser.add_argument("--small", action="store_true", help="tiny sizes, to check the script itself")
    parser.add_argument("--dry", action="store_true", help="on the CPU at tiny sizes (the default without CUDA)")
    args = parser.parse_args()
    dry = args.dry or not torch.cuda.is_available()
    device, small = ("cpu", True) if dry else ("cuda", args.small)
    train_config = TINY if small else Qwen2Config.from_preset("Qwen2-0.5B").to_hf_dict()
    decode_config = TINY if small else Qwen2Config.from_preset("Qwen2-7B").to_hf_dict()
    keep = {f for f in Qwen2Config.__dataclass_fields__}
    train_config = {k: v for k, v in train_config.items() if k in keep}
    decode_config = {k: v for k, v in decode_config.items() if k in keep}
    report = {"device": "cpu (dry run)" if dry else torch.cuda.get_device_name(), "torch": torch.__version__}
    report["correctness"] = correctness(device)
    print(json.dumps(report), flush=True)
    sizes = (2, 32, 1, 8, 4) if dry else (4, 128, 3, 32, 16) if small else (4, 512, 10, 512, 128)
    batch, seq, steps, prompt, new = sizes
    report["train_step"] = train_speed(train_config, batch, seq, steps, device)
    print(json.dumps(report["train_step"]), flush=True)
    report["decode"] = decode_speed(decode_config, prompt, new, device)
    print(json.dumps(report, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    if not report["correctness"]["ok"]:
        raise SystemExit(f"correctness checks failed: {report['correctness']}")


if __name__ == "__main__":
    main()
