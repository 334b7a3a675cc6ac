"""CUDA check in one run: correctness on tiny configs against the CPU, then speed at real sizes on
random weights (no checkpoint can travel to a lent GPU machine).

    python bench/gpu_check.py [--out results.json] [--small]     # --small: tiny sizes
    python bench/gpu_check.py --dry                                # no GPU: every step on the CPU, tiny sizes
    python bench/gpu_check.py --parts correctness,int4,engine     # some parts only (the Triton kernels')

--dry (automatic without CUDA) runs the whole script on the CPU at tiny sizes, so the slow tests
check it end to end: the checks that need no second device (cached decode vs a full forward, the
fused loss and its gradients) must pass, and the speed steps run for shape only (their numbers mean
nothing). The exit status is 1 when a correctness check fails. Each part's result is printed as a
JSON line and --out is rewritten after each, so a run stopped by its time limit keeps what it
measured; a part that raises is recorded with its error and the rest still run.

Correctness: logits CPU vs CUDA (float32), cached decode vs a full forward, the fused training
loss and its gradients vs autograd through full logits, one training step's loss CPU vs CUDA; the
engine's greedy tokens on the CPU, on CUDA eagerly and on CUDA through CUDA graphs (float32).
Speed: one training step of the Qwen2-0.5B config (float32 master weights, bf16 autocast, AdamW;
full and LoRA rank 8) beside transformers (+ peft when installed); batch-1 greedy decode of the
Qwen2-7B config in bf16 after a 512-token prompt, ours (the model with its KV cache, no engine)
beside transformers' generate, with the bandwidth that implies; the engine at the Qwen2-7B config
in bf16: prefill of 512-token prompts, and greedy decode at batch 1 and 32 after
them, eager (full logits to the host), fixed-shape eager and CUDA graphs (tokens drawn on the
device), each as tokens/s and as a share of the HBM roofline (bytes a step must read: the
weights once and every row's keys and values, over the device's peak bandwidth), once with the
model's own attention and once with the decode steps' attention, norms and SiLU in our Triton kernels
(qwen2.engine.triton_decode; its greedy tokens checked against the CPU's first). MoE (part
"moe"): the grouped experts against the per-expert loop and the CPU on a tiny config, the
engine's greedy tokens eager and through captured graphs (MoE layers inside), then decode of the
Qwen2-57B-A14B config cut to a few layers in bf16, eager and graphed, beside transformers'
Qwen2-MoE. Int4 (part "int4"): each CUDA int4 kernel's layer (torch's tinygemm and our Triton
kernels, qwen2.quant.triton_int4) against its own integers' float weights (from our quantizer and
from GPTQ-style integers with an act-order permutation), then the Qwen2-7B config with int4 weights
on each kernel decoding through the engine, as for bf16. GGUF blocks (part "gguf"): our Triton
kernels (qwen2.quant.triton_blocks) decoding each block type bit for bit as gguf-py does and
multiplying within bf16 rounding, each type's layer at the config's shapes beside bf16's and
Int8Linear's (our Triton int8 kernels, qwen2.quant.triton_int8), then the Qwen2-7B config through
the engine on a Q4_K_M-like mix of random blocks, and on int8. Random weights and no tokenizer (none
travels to the GPU machine): detokenizing is left out of the timings.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
import traceback

import torch
import torch.nn.functional as F

from qwen2.config import Qwen2Config
from qwen2.engine.cuda_graphs import StaticDecode
from qwen2.engine.engine import Engine
from qwen2.engine.sampling import SamplingParams
from qwen2.engine.triton_decode import TritonDecode
from qwen2.model import KVCache, Transformer
from qwen2.quant.int_linear import quantize_int4, quantize_model
from qwen2.quant.kernels import BLOCKS
from qwen2.quant.prequantized import to_int4_linear
from qwen2.train.data import Batch
from qwen2.train.lora import add_lora
from qwen2.train.loss import LinearCrossEntropy, loss_sum
from qwen2.weights.gptq_awq import UnpackedLinear

TINY = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=True)
TINY_MOE = dict(TINY, model_type="qwen2_moe", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                shared_expert_intermediate_size=64, tie_word_embeddings=False)
MOE_LAYERS = 4  # of Qwen2-57B-A14B's 28: the speed of a layer is the point, and all 28 would take most of the card


# peak HBM bandwidth (bytes/s) and dense bf16 tensor throughput (FLOP/s) by device name, from the
# vendors' data sheets; the first name that appears in torch.cuda.get_device_name() wins
PEAKS = [("H200", 4.8e12, 989e12), ("H100 NVL", 3.9e12, 835e12), ("H100 PCIe", 2.0e12, 756e12),
         ("H100", 3.35e12, 989e12), ("A100-SXM4-80GB", 2.039e12, 312e12), ("A100 80GB PCIe", 1.935e12, 312e12),
         ("A100", 1.555e12, 312e12)]


class NoText:
    """The engine's tokenizer for random weights: token ids in, no text out."""

    eos_token_ids: list[int] = []

    def stream_decoder(self) -> NoText:
        return self

    def push(self, token: int) -> str:
        return ""

    def flush(self) -> str:
        return ""


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
    out |= engine_tokens(cpu.eval(), gpu.eval(), device)
    out["ok"] = (out["logits_max_abs_diff"] < 1e-3 and out["cached_decode_max_abs_diff"] < 1e-3
                 and out["fused_loss_rel_diff"] < 1e-4 and out["train_loss_rel_diff"] < 1e-4
                 and out["engine_eager_tokens_equal_cpu"] and out["engine_graph_tokens_equal_cpu"]
                 and (device != "cuda" or out["engine_graphs_captured"] > 0)
                 and out.get("triton_decode_eager_tokens_equal_cpu", True)
                 and out.get("triton_decode_graph_tokens_equal_cpu", True))
    return out


def moe_correctness(device: str) -> dict:
    """Grouped experts against the per-expert loop and the CPU (float32), and the engine's greedy
    tokens eager against graphed with the MoE layers captured (bf16, where grouped GEMMs need no host)."""
    torch.manual_seed(0)
    cpu = Transformer(Qwen2Config(**TINY_MOE)).eval()
    with torch.no_grad():
        cpu.model.embed_tokens.weight.normal_(0, 1.0)
    grouped = Transformer(Qwen2Config(**TINY_MOE)).to(device).eval()
    grouped.load_state_dict(cpu.state_dict())
    out = {"moe_layers_ungrouped": grouped.fuse_weights()}
    ids = torch.randint(0, 1024, (2, 50))
    with torch.no_grad():
        loop = cpu(ids)
        out["moe_grouped_vs_cpu_loop_max_abs_diff"] = float((grouped(ids.to(device)).cpu() - loop).abs().max())
    half = Transformer(Qwen2Config(**TINY_MOE)).to(device).to(torch.bfloat16).eval()
    half.load_state_dict(cpu.state_dict())
    half.set_rope(half.config)
    with torch.inference_mode():  # the same fixed shapes run eagerly, then replayed from graphs
        eager, _ = greedy_tokens(half, static_decode=True, capture=False)
        graphed, engine = greedy_tokens(half, static_decode=True, capture=device == "cuda")
    out["moe_graph_tokens_equal_eager"] = graphed == eager
    out["moe_graphs_captured"] = len(engine.static_decode.graphs)
    out["ok"] = (out["moe_layers_ungrouped"] == [] and out["moe_grouped_vs_cpu_loop_max_abs_diff"] < 1e-3
                 and out["moe_graph_tokens_equal_eager"] and (device != "cuda" or out["moe_graphs_captured"] > 0))
    return out


@torch.no_grad()
def int4_correctness(device: str) -> dict:
    """Each CUDA int4 kernel's layer (torch's tinygemm, our Triton kernels) against the float weights
    of its own integers: quantized by us, and from GPTQ-style integers whose groups gather the inputs
    out of order (act-order); at 1 row (the Triton GEMV) and 37 (tiles on the tensor cores)."""
    if device != "cuda":
        return {"skipped": "the CUDA int4 kernels need CUDA", "ok": True}
    out, ok = {}, True
    for kernel, layer_type in (("tinygemm", "CudaInt4Linear"), ("triton", "TritonInt4Linear")):
        torch.manual_seed(0)
        linear = torch.nn.Linear(1024, 512, device=device)
        layer = quantize_model(torch.nn.Sequential(linear), "int4", 128, cuda_kernel=kernel)[0]
        q, scale, zero = quantize_int4(linear.weight.detach(), 128)
        w = (q.float() - 8).view(512, -1, 128) * scale.float()[..., None] + zero.float()[..., None]
        w = w.view(512, 1024)
        n, k, groups = 512, 1024, 8
        g_idx = torch.randperm(k) % groups  # act-order: each group's inputs scattered over the row
        unpacked = UnpackedLinear(torch.randint(0, 16, (n, k), dtype=torch.uint8),
                                  torch.randint(0, 16, (groups, n), dtype=torch.int32), torch.rand(groups, n) / 50,
                                  g_idx)
        w_gptq = (unpacked.q.float() - unpacked.zeros[g_idx].T.float()) * unpacked.scales[g_idx].T
        gptq = to_int4_linear(unpacked, k // groups, None, device, kernel)
        for rows in (1, 37):
            x = torch.randn(rows, 1024, device=device)
            want = x.bfloat16().float() @ w.T + linear.bias
            out[f"{kernel}/{rows}_rows_quantized_rel_err"] = float((layer(x).float() - want).norm() / want.norm())
            want = x.bfloat16().float().cpu() @ w_gptq.T
            out[f"{kernel}/{rows}_rows_gptq_act_order_rel_err"] = float(
                (gptq(x).float().cpu() - want).norm() / want.norm())
        out[f"{kernel}/layer"] = type(layer).__name__
        ok = ok and type(layer).__name__ == layer_type == type(gptq).__name__ and all(
            v < 0.01 for key, v in out.items() if key.startswith(kernel) and key.endswith("rel_err"))
    out["ok"] = ok
    return out


def matrix_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """The config's matrices (out, in) by the projections that have them."""
    c = Qwen2Config(**config)
    return {"q/o": (c.hidden_size, c.hidden_size), "k/v": (c.num_key_value_heads * c.head_dim, c.hidden_size),
            "gate/up": (c.intermediate_size, c.hidden_size), "down": (c.hidden_size, c.intermediate_size)}


def layer_time(layer, x: torch.Tensor, weight_bytes: int, device: str, peaks: dict) -> dict:
    """Microseconds of layer(x), and the bytes of weights it reads a second (and their share of HBM)."""
    seconds = timed(functools.partial(layer, x), 50 if device == "cuda" else 2, device)
    row = {"us": 1e6 * seconds, "gb_per_s": weight_bytes / seconds / 1e9}
    if peaks.get("hbm_bytes_per_s"):
        row["hbm_pct"] = 100 * weight_bytes / seconds / peaks["hbm_bytes_per_s"]
    return row


@torch.no_grad()
def int4_layer_speed(config: dict, device: str, peaks: dict) -> dict:
    """Each int4 kernel on the config's matrix shapes at 1, 32 and 512 rows: microseconds, the bytes
    of packed weights read per second, and (Triton) the block sizes its tuner chose. A dry run
    times the CPU's int4 layer at tiny sizes, for shape only."""
    out = {}
    for kernel in ("tinygemm", "triton") if device == "cuda" else ("cpu",):
        for name, (n, k) in matrix_shapes(config).items():
            linear = torch.nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
            layer = quantize_model(torch.nn.Sequential(linear), "int4", 128,
                                   cuda_kernel="tinygemm" if kernel == "cpu" else kernel)[0]
            packed = sum(t.numel() * t.element_size() for t in layer.buffers() if t is not None)
            for rows in (1, 32, 512):
                x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
                out[f"{kernel}/{name} {n}x{k}/{rows} rows"] = layer_time(layer, x, packed, device, peaks)
            del layer, linear
    if device == "cuda":
        from qwen2.quant import triton_int4

        out["triton_configs"] = {"gemv": triton_int4.GEMV.chosen(), "tiles": triton_int4.TILES.chosen()}
    return out


def random_blocks(qtype: int, rows: int, columns: int, device: str) -> torch.Tensor:
    """Rows of random bytes in `qtype`'s GGUF blocks, their float16 scales small finite halves (a
    weight then lies within about +-1, as a real file's do)."""
    per_block, block_bytes = BLOCKS[qtype]
    raw = torch.randint(0, 256, (rows, columns // per_block, block_bytes), dtype=torch.uint8, device=device)
    for at in {14: (208,), 12: (0, 2), 13: (0, 2)}.get(qtype, (0,)):
        halves = (torch.rand(rows, columns // per_block, device=device) * 2e-3 - 1e-3).half()
        raw[:, :, at:at + 2] = halves.view(torch.uint8).view(rows, -1, 2)
    return raw.view(rows, -1)


def random_gguf_blocks(model: Transformer) -> None:
    """Every Linear of `model` replaced by random GGUF blocks on our Triton kernels, in the types of
    llama.cpp's Q4_K_M mix (Q4_K; Q6_K for v, down and the output head, which Q4_K_M gives some or all;
    Q5_0 and Q8_0 in their place where rows do not split into K-quants' 256, as in the default model)."""
    from qwen2.quant.triton_blocks import TritonBlockLinear

    for name, linear in [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]:
        wide = name.endswith(("v_proj", "down_proj", "lm_head"))
        qtype = (14 if wide else 12) if linear.in_features % 256 == 0 else (8 if wide else 6)
        blocks = random_blocks(qtype, linear.out_features, linear.in_features, linear.weight.device.type)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child,
                TritonBlockLinear(blocks, qtype, linear.in_features, linear.bias))


@torch.no_grad()
def gguf_correctness(device: str) -> dict:
    """Our Triton kernels on each GGUF block type: decoding random bytes bit for bit as gguf-py
    does, and the products at 1 row (GEMV) and 37 (tiles on the tensor cores) in bf16 against the
    float weights."""
    if device != "cuda":
        return {"skipped": "the Triton block kernels run on CUDA (on the CPU, the tests run them interpreted)",
                "ok": True}
    from gguf import GGMLQuantizationType, dequantize

    from qwen2.quant import CUDA_BLOCK_TYPES
    from qwen2.quant.triton_blocks import blocks_matmul, dequantize_rows

    out, ok = {}, True
    for qtype in CUDA_BLOCK_TYPES:
        name = GGMLQuantizationType(qtype).name
        blocks = random_blocks(qtype, 512, 1024, device)
        w = torch.from_numpy(dequantize(blocks.cpu().numpy(), GGMLQuantizationType(qtype)).reshape(512, 1024))
        decoded = dequantize_rows(blocks, qtype, 1024).cpu()
        out[f"{name}/decoded_equal"] = bool(torch.equal(decoded, w.float()))
        for rows in (1, 37):
            x = torch.randn(rows, 1024, device=device, dtype=torch.bfloat16)
            want = x.double().cpu() @ w.double().T
            got = blocks_matmul(x, blocks, qtype, 1024).double().cpu()
            out[f"{name}/{rows}_rows_rel_err"] = float((got - want).norm() / want.norm())
        ok = ok and out[f"{name}/decoded_equal"] and all(out[f"{name}/{r}_rows_rel_err"] < 0.01 for r in (1, 37))
    out["ok"] = ok
    return out


@torch.no_grad()
def int8_correctness(device: str) -> dict:
    """Int8Linear on CUDA (our Triton kernels) against the float weights of its own integers, at 1 row
    (the GEMV) and 37 (tiles on the tensor cores), in bf16."""
    if device != "cuda":
        return {"skipped": "Int8Linear runs our Triton kernels on CUDA only", "ok": True}
    torch.manual_seed(0)
    linear = torch.nn.Linear(1024, 512, device=device, dtype=torch.bfloat16)
    layer = quantize_model(torch.nn.Sequential(linear), "int8")[0]
    w = layer.weight.double() * layer.scales.double()[:, None]
    out = {}
    for rows in (1, 37):
        x = torch.randn(rows, 1024, device=device, dtype=torch.bfloat16)
        want = x.double() @ w.T + linear.bias.double()
        out[f"{rows}_rows_rel_err"] = float((layer(x).double() - want).norm() / want.norm())
    out["ok"] = all(v < 0.01 for v in out.values())
    return out


@torch.no_grad()
def gguf_layer_speed(config: dict, device: str, peaks: dict) -> dict:
    """Our Triton block kernels on the config's matrix shapes, per type, at 1, 32 and 512 rows, beside
    the bf16 matrix's F.linear and Int8Linear (our Triton int8 kernels): microseconds, the bytes of
    weights read per second, and the block sizes the tuner chose."""
    if device != "cuda":
        return {"skipped": "the Triton block kernels run on CUDA"}
    from gguf import GGMLQuantizationType

    from qwen2.quant import triton_blocks

    out = {}
    for name, (n, k) in matrix_shapes(config).items():
        weight = torch.randn(n, k, device=device, dtype=torch.bfloat16)
        layers = {"bf16": functools.partial(F.linear, weight=weight)}
        sizes = {"bf16": weight.numel() * 2}
        for qtype in (12, 14, 8, 6):  # Q4_K, Q6_K, Q8_0, Q5_0: the default model's mix
            blocks = random_blocks(qtype, n, k, device)
            layers[GGMLQuantizationType(qtype).name] = functools.partial(
                triton_blocks.blocks_matmul, blocks=blocks, qtype=qtype, in_features=k)
            sizes[GGMLQuantizationType(qtype).name] = blocks.numel()
        int8 = quantize_model(torch.nn.Sequential(torch.nn.Linear(k, n, bias=False, device=device,
                                                                  dtype=torch.bfloat16)), "int8")[0]
        layers["int8"], sizes["int8"] = int8, n * k + 2 * n  # Int8Linear on our Triton kernels (triton_int8.py)
        for rows in (1, 32, 512):
            x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
            for kind, layer in layers.items():
                out[f"{kind}/{name} {n}x{k}/{rows} rows"] = layer_time(layer, x, sizes[kind], device, peaks)
        del weight, layers
        free_memory(device)
    from qwen2.quant import triton_int8

    out["triton_configs"] = {f"{module.__name__.rsplit('.', 1)[1]} {kind}": kernel.chosen()
                             for module in (triton_blocks, triton_int8)
                             for kind, kernel in (("gemv", module.GEMV), ("tiles", module.TILES))}
    return out


def greedy_tokens(model: Transformer, static_decode: bool, capture: bool = True) -> tuple[list[list[int]], Engine]:
    """Greedy tokens of four prompts decoding together (a batch padded from 3 or 4 rows)."""
    engine = Engine(model, NoText(), max_concurrency=4, max_seq_len=128, prefill_chunk=32,
                    static_decode=static_decode and capture)
    if static_decode and not capture:
        engine.static_decode = StaticDecode(model, engine.cache, capture=False)
    generator = torch.Generator().manual_seed(1)
    requests = [engine.submit(torch.randint(0, model.config.vocab_size, (n,), generator=generator).tolist(),
                              SamplingParams(temperature=0, max_tokens=16 + n // 8, ignore_eos=True))
                for n in (5, 17, 40, 9)]
    while engine.has_work:
        engine.step()
    return [r.output for r in requests], engine


def engine_tokens(cpu: Transformer, gpu: Transformer, device: str) -> dict:
    """The engine's greedy tokens on the CPU against its eager and its graphed decode on `device`
    (in a dry run, both on the CPU, the "graphed" one running its fixed shapes eagerly)."""
    with torch.inference_mode():
        reference, _ = greedy_tokens(cpu, static_decode=False)
        eager, _ = greedy_tokens(gpu, static_decode=False)
        graphed, engine = greedy_tokens(gpu, static_decode=True, capture=device == "cuda")
    out = {"engine_eager_tokens_equal_cpu": eager == reference, "engine_graph_tokens_equal_cpu": graphed == reference,
           "engine_graphs_captured": len(engine.static_decode.graphs)}
    if device == "cuda":  # the decode step's Triton kernels, eager and captured (the CPU runs them in tests)
        gpu.decode_step = TritonDecode(gpu)
        with torch.inference_mode():
            eager, _ = greedy_tokens(gpu, static_decode=False)
            graphed, _ = greedy_tokens(gpu, static_decode=True)
        gpu.decode_step = None
        out["triton_decode_eager_tokens_equal_cpu"] = eager == reference
        out["triton_decode_graph_tokens_equal_cpu"] = graphed == reference
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
    model.fuse_weights()
    weight_bytes = weight_bytes_per_step(model)
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
        moe = config.get("model_type") == "qwen2_moe"
        model_class, config_class = ((transformers.Qwen2MoeForCausalLM, transformers.Qwen2MoeConfig) if moe
                                     else (transformers.Qwen2ForCausalLM, transformers.Qwen2Config))
        with torch.device(device):
            theirs = model_class(config_class(**config)).eval()
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


def device_peaks(device: str) -> dict:
    """The device's peak bandwidth and bf16 throughput from PEAKS, and a measured device-to-device copy."""
    if device != "cuda":
        return {"name": "cpu (dry run)", "hbm_bytes_per_s": None, "bf16_flops": None, "copy_bytes_per_s": None}
    name = torch.cuda.get_device_name()
    bandwidth, flops = next(((b, f) for key, b, f in PEAKS if key in name), (None, None))
    buffers = torch.empty(2, 2**30, dtype=torch.uint8, device=device)
    seconds = timed(lambda: buffers[1].copy_(buffers[0]), 10, device)
    copy = 2 * 2**30 / seconds  # a copy reads and writes every byte
    return {"name": name, "hbm_bytes_per_s": bandwidth or copy, "bandwidth_source": "table" if bandwidth else "copy",
            "bf16_flops": flops, "copy_bytes_per_s": copy}


def random_model(config: dict, device: str, dtype: torch.dtype) -> Transformer:
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(Qwen2Config(**config)).to(dtype).eval()
    model.set_rope(model.config)  # rotary frequencies back in float32
    return model


def weight_bytes_per_step(model: Transformer, rows: int = 1) -> int:
    """Bytes of weights a decode step of `rows` rows reads: every matrix once (as stored: int4
    layers' packed buffers); of the embedding only a few rows, unless it is also the output head;
    of the experts the share that `rows` tokens route to, expected under uniform routing."""
    embedding = model.model.embed_tokens.weight
    tied = getattr(model.lm_head, "weight", None) is embedding
    config = model.config
    touched = 1 - (1 - config.num_experts_per_tok / config.num_experts) ** rows if config.is_moe else 1
    total = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t is None or name == "inv_freq" or (t is embedding and not tied):
            continue
        total += t.numel() * t.element_size() * (touched if ".experts." in name else 1)
    return int(total)


def submit_random(engine: Engine, rows: int, prompt: int, new: int, generator: torch.Generator) -> list:
    vocab = engine.model.config.vocab_size
    return [engine.submit(torch.randint(0, vocab, (prompt,), generator=generator).tolist(),
                          SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)) for _ in range(rows)]


def engine_prefill(model: Transformer, rows: int, prompt: int, kv_memory: int, device: str) -> float:
    """Seconds to prefill `rows` prompts (and draw each one token), after one warm-up prompt."""
    engine = Engine(model, NoText(), max_concurrency=rows, max_seq_len=2 * prompt, prefill_chunk=prompt,
                    kv_memory=kv_memory, static_decode=False)
    generator = torch.Generator().manual_seed(0)
    for rounds in (1, rows):
        sync(device)
        start = time.perf_counter()
        submit_random(engine, rounds, prompt, 1, generator)
        while engine.has_work:
            engine.step()
        sync(device)
    return time.perf_counter() - start


def engine_decode(model: Transformer, rows: int, prompt: int, steps: int, kv_memory: int, mode: str,
                  device: str) -> tuple[float, int]:
    """Seconds per decode step of `rows` requests after `prompt`-token prompts, and the graphs captured."""
    engine = Engine(model, NoText(), max_concurrency=rows, max_seq_len=2 * prompt, prefill_chunk=prompt,
                    kv_memory=kv_memory, static_decode=mode == "graph")
    if mode == "static":
        engine.static_decode = StaticDecode(model, engine.cache, capture=False)
    elif mode == "compiled":  # torch.compile's fused kernels, captured
        engine.static_decode = StaticDecode(model, engine.cache, capture=device == "cuda", compile=True)
    requests = submit_random(engine, rows, prompt, 4 + steps + 1, torch.Generator().manual_seed(0))
    while not all(r.output for r in requests):
        engine.step()
    for _ in range(4):  # warm-up, captures included
        engine.step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync(device)
    seconds = (time.perf_counter() - start) / steps
    assert all(len(r.output) == 5 + steps for r in requests), "a request finished early or lost a step"
    return seconds, len(engine.static_decode.graphs) if engine.static_decode else 0


def engine_speed(name: str, config: dict, prompt: int, steps: int, batches: tuple[int, ...], device: str,
                 peaks: dict, quant: str = "none", attention: str = "torch") -> dict:
    """Prefill and decode through the engine at one config in bf16 on random weights (with `quant`
    "int4" or "int4/triton": every Linear's weights quantized in place first, on that CUDA kernel;
    "gguf/triton": every Linear a Q4_K_M-like mix of random GGUF blocks on our Triton kernels; with
    `attention` "triton": decode steps through qwen2.engine.triton_decode's kernels)."""
    dtype = torch.bfloat16
    model = random_model(config, device, dtype)
    mode, _, kernel = quant.partition("/")
    if mode == "gguf":
        random_gguf_blocks(model)
    elif quant != "none":
        quantize_model(model, mode, 128, cuda_kernel=kernel or "tinygemm")
    free_memory(device)
    if attention == "triton":  # after quantizing: the step stacks q/k/v and gate/up of our kernels' layers
        model.decode_step = TritonDecode(model)
    weights = weight_bytes_per_step(model)
    per_token = 2 * model.config.num_hidden_layers * model.config.num_key_value_heads * model.config.head_dim * 2
    bandwidth, flops = peaks["hbm_bytes_per_s"], peaks["bf16_flops"]
    out = {"config": name, "quant": quant, "attention": attention, "weight_gb_per_step": weights / 1e9,
           "kv_kib_per_token": per_token / 1024}
    kv_memory = (max(batches) + 1) * 2 * prompt * per_token
    c = model.config  # a token's matrix products: its active parameters, less an untied embedding's lookup
    matmul_params = c.num_params()["active"] - c.vocab_size * c.hidden_size * (not c.tie_word_embeddings)
    attention_flop = 2 * model.config.num_hidden_layers * model.config.hidden_size * prompt  # per token, causal
    for rows in batches:
        seconds = engine_prefill(model, rows, prompt, kv_memory, device)
        tokens = rows * prompt
        flop = (2 * matmul_params + attention_flop) * tokens
        row = {"tokens_per_s": tokens / seconds, "tflops": flop / seconds / 1e12}
        if flops:
            row["mfu_pct"] = 100 * flop / seconds / flops
        out[f"prefill/{prompt}x{rows}"] = row
        free_memory(device)
        context = prompt + 5 + steps // 2  # keys each row reads, on average over the timed steps
        step_bytes = weight_bytes_per_step(model, rows) + rows * context * per_token
        for mode in ("eager", "static", "graph") if device == "cuda" else ("eager", "static"):
            seconds, graphs = engine_decode(model, rows, prompt, steps, kv_memory, mode, device)
            row = {"ms_per_step": seconds * 1e3, "tokens_per_s": rows / seconds, "gb_per_s": step_bytes / seconds / 1e9,
                   "graphs": graphs}
            if bandwidth:
                row["hbm_roofline_pct"] = 100 * step_bytes / seconds / bandwidth
            out[f"decode/batch{rows}/{mode}"] = row
            free_memory(device)
    del model
    free_memory(device)
    return out


def profile_decode(config: dict, prompt: int, steps: int, device: str, triton_step: bool = False) -> str:
    """torch.profiler's table of `steps` batch-1 fixed-shape decode steps run eagerly (a graph's
    replay hides its kernels), the kernels by device time: where a step's time goes (with
    `triton_step`, through qwen2.engine.triton_decode's kernels)."""
    from torch.profiler import ProfilerActivity, profile

    model = random_model(config, device, torch.bfloat16)
    if triton_step:
        model.decode_step = TritonDecode(model)
    engine = Engine(model, NoText(), max_concurrency=1, max_seq_len=2 * prompt, prefill_chunk=prompt,
                    static_decode=False)
    engine.static_decode = StaticDecode(model, engine.cache, capture=False)
    submit_random(engine, 1, prompt, steps + 8, torch.Generator().manual_seed(0))
    for _ in range(4):
        engine.step()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            engine.step()
        sync(device)
    del model, engine
    free_memory(device)
    key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60)


def attention_decode_times(device: str) -> dict:
    """Microseconds of one decode step's attention at the Qwen2-7B shape (28 query heads over 4
    KV heads as 7 rows each, 576 keys, a mask as the fixed-shape step passes one), per SDPA
    backend and written out as two matrix products: which one a decode step should call."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = torch.bfloat16
    q = torch.randn(1, 4, 7, 128, device=device, dtype=dtype)
    k, v = (torch.randn(1, 4, 576, 128, device=device, dtype=dtype) for _ in range(2))
    mask = torch.zeros(1, 1, 1, 576, device=device, dtype=torch.bool)
    mask[..., :530] = True
    out = {}
    for name, backend in [("cudnn", SDPBackend.CUDNN_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("math", SDPBackend.MATH)]:
        try:
            with sdpa_kernel(backend):
                out[name] = 1e6 * timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), 200, device)
        except RuntimeError as e:
            out[name] = f"unavailable: {str(e)[:80]}"

    def products() -> torch.Tensor:
        scores = (q @ k.transpose(-1, -2)).float().masked_fill_(~mask, float("-inf")) * 128 ** -0.5
        return torch.softmax(scores, -1).to(dtype) @ v

    out["two_matmuls"] = 1e6 * timed(products, 200, device)
    return out


def compiled_decode(config: dict, prompt: int, steps: int, device: str, peaks: dict) -> dict:
    """Batch-1 bf16 decode through the engine with its fixed-shape step compiled (torch.compile)
    and captured, beside the same step captured uncompiled; the first steps pay the compilation."""
    model = random_model(config, device, torch.bfloat16)
    per_token = 2 * model.config.num_hidden_layers * model.config.num_key_value_heads * model.config.head_dim * 2
    kv_memory = 2 * 2 * prompt * per_token
    step_bytes = weight_bytes_per_step(model) + (prompt + 5 + steps // 2) * per_token
    out = {}
    for mode in ("graph", "compiled"):
        start = time.perf_counter()
        seconds, graphs = engine_decode(model, 1, prompt, steps, kv_memory, mode, device)
        out[mode] = {"ms_per_step": seconds * 1e3, "tokens_per_s": 1 / seconds, "graphs": graphs,
                     "wall_s_with_compile": time.perf_counter() - start}
        if peaks["hbm_bytes_per_s"]:
            out[mode]["hbm_roofline_pct"] = 100 * step_bytes / seconds / peaks["hbm_bytes_per_s"]
    del model
    free_memory(device)
    return out


def preset(name: str, **overrides) -> dict:
    keep = set(Qwen2Config.__dataclass_fields__)
    config = {k: v for k, v in Qwen2Config.from_preset(name).to_hf_dict().items() if k in keep} | overrides
    if "layer_types" in config:  # one per layer: transformers refuses a list longer than the layers kept
        config["layer_types"] = config["layer_types"][:config["num_hidden_layers"]]
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out")
    parser.add_argument("--small", action="store_true", help="tiny sizes, to check the script itself")
    parser.add_argument("--dry", action="store_true", help="on the CPU at tiny sizes (the default without CUDA)")
    parser.add_argument("--parts", default="correctness,train,decode,engine,moe,int4,gguf,compile,profile",
                        help="comma-separated parts to run (default: all)")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    dry = args.dry or not torch.cuda.is_available()
    device, small = ("cpu", True) if dry else ("cuda", args.small)
    train_config = TINY if small else preset("Qwen2-0.5B")
    decode_config = TINY if small else preset("Qwen2-7B")
    moe_config = TINY_MOE if small else preset("Qwen2-57B-A14B", num_hidden_layers=MOE_LAYERS)
    report = {"device": "cpu (dry run)" if dry else torch.cuda.get_device_name(), "torch": torch.__version__}
    started = time.perf_counter()

    def record(key: str, value) -> None:
        """Keep a part's result, print it, and rewrite --out: a run cut short keeps what it measured."""
        report[key] = value
        print(value if isinstance(value, str) else json.dumps({key: value}), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=2)

    checks = []
    if "correctness" in parts:
        checks.append(("correctness", correctness))
    if "moe" in parts:
        checks.append(("moe_correctness", moe_correctness))
    if "int4" in parts:
        checks.append(("int4_correctness", int4_correctness))
    if "gguf" in parts:
        checks += [("gguf_correctness", gguf_correctness), ("int8_correctness", int8_correctness)]
    for key, check in checks:
        try:
            record(key, check(device))
        except Exception as e:  # a kernel that fails here must not cost the measurements after it
            traceback.print_exc()
            record(key, {"ok": False, "error": f"{type(e).__name__}: {e}"})
    for part, layer_speed in (("int4", int4_layer_speed), ("gguf", gguf_layer_speed)):
        if part in parts:
            try:
                record(f"{part}_layers", layer_speed(decode_config, device, device_peaks(device)))
            except Exception as e:
                traceback.print_exc()
                record(f"{part}_layers", {"error": f"{type(e).__name__}: {e}"})
    sizes = (2, 32, 1, 8, 4) if dry else (4, 128, 3, 32, 16) if small else (4, 512, 10, 512, 128)
    batch, seq, steps, prompt, new = sizes
    if "train" in parts:
        record("train_step", train_speed(train_config, batch, seq, steps, device))
    if "decode" in parts:
        record("decode", decode_speed(decode_config, prompt, new, device))
    if "moe" in parts:
        record("moe_decode", decode_speed(moe_config, prompt, new, device))
    runs = []  # (name, config, quant, attention) through the engine
    dense = "tiny" if small else "Qwen2-7B"
    if "engine" in parts:
        runs.append((dense, decode_config, "none", "torch"))
        if not dry:  # our Triton kernels (on the CPU only in Triton's interpreter, which the tests run)
            runs.append((dense, decode_config, "none", "triton"))
    if "int4" in parts:
        runs.append((dense, decode_config, "int4", "torch"))
        if not dry:
            runs += [(dense, decode_config, "int4/triton", "torch"), (dense, decode_config, "int4/triton", "triton")]
    if "gguf" in parts and not dry:
        runs += [(dense, decode_config, "gguf/triton", "torch"), (dense, decode_config, "gguf/triton", "triton"),
                 (dense, decode_config, "int8", "torch")]
    if "moe" in parts:
        moe = "tiny-moe" if small else f"Qwen2-57B-A14B ({MOE_LAYERS} of 28 layers)"
        runs += [(moe, moe_config, "none", "torch")] + ([] if dry else [(moe, moe_config, "none", "triton")])
    if runs:
        report["peaks"] = device_peaks(device)
        engine_prompt, engine_steps = (16, 4) if dry else (64, 16) if small else (512, 64)
        record("engine", [])
        for name, config, quant, attention in runs:
            try:
                row = engine_speed(name, config, engine_prompt, engine_steps, (1, 4) if dry else (1, 32), device,
                                   report["peaks"], quant, attention)
            except Exception as e:  # keep what the other configs measure
                traceback.print_exc()
                row = {"config": name, "quant": quant, "attention": attention, "error": f"{type(e).__name__}: {e}"}
                free_memory(device)
            record("engine", [*report["engine"], row])
    if "compile" in parts:
        record("compiled", compiled_decode(decode_config, 512 if not small else 16, 64 if not small else 4, device,
                                           device_peaks(device)))
    if "profile" in parts:
        record("attention_decode_us", attention_decode_times(device))
        record("profile", profile_decode(decode_config, prompt, 8, device))
        if not dry:  # the Triton kernels run only in the interpreter on the CPU
            record("profile_triton_decode", profile_decode(decode_config, prompt, 8, device, triton_step=True))
    record("wall_s", time.perf_counter() - started)
    failed = [key for key, _ in checks if not report[key]["ok"]]
    if failed:
        raise SystemExit(f"correctness checks failed: {', '.join(failed)}")
    if any("error" in row for row in report.get("engine", [])):
        raise SystemExit("an engine measurement failed (see its error above)")


if __name__ == "__main__":
    main()
