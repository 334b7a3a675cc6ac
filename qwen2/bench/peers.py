"""The engines: one runner per peer, each run in its own process (qwen2.bench.rows), all timed by
the same protocol (`measure`) on the same token ids."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

PEERS = ("qwen2", "llama.cpp", "transformers")
# Each peer's variants, one subprocess each; --quick runs only the first.
VARIANTS: dict[str, list[dict[str, Any]]] = {
    "qwen2": [{"quant": q} for q in ("auto", "gguf-f32", "none", "int4")],
    "llama.cpp": [{"flash_attn": False}, {"flash_attn": True}],
    "transformers": [{"dtype": "float32"}, {"dtype": "bfloat16"}],
}
Stamps = tuple[float, float, float, int]  # (start, first token, end, generated tokens)
Generate = Callable[[list[list[int]], int], Stamps]  # (prompts, new tokens) -> stamps


def variant_name(peer: str, variant: dict[str, Any]) -> str:
    return f"{peer} [{', '.join(f'{k}={v}' for k, v in variant.items())}]"


# A runner gets the spec (model, threads, workload, sizes) and returns metrics plus
# `weight_bytes` (read per decoded token) and `kv_bytes_per_pos` for the roofline.
# Its generate() returns the Stamps of one batch of prompts.
# Batch 1: prefill_tps = prompt / (first - start), decode_tps = (tokens - 1) / (end - first).
# Concurrent (c4, c16): tokens / (end - start), prefill of the short prompts included.


def summarize(spec: dict[str, Any], load_s: float, single: list[Stamps], concurrent: dict[int, Stamps],
              **extra: Any) -> dict[str, Any]:
    from qwen2.memory import peak_rss_mib

    prompt_len = len(spec["prompt"])
    result: dict[str, Any] = {
        "load_s": round(load_s, 3),
        "prefill_tps": round(statistics.median(prompt_len / (f - s) for s, f, _, _ in single), 2),
        "decode_tps": round(statistics.median((n - 1) / (e - f) for _, f, e, n in single), 2),
    }
    for c, (s, _, e, n) in concurrent.items():
        result[f"decode_tps_c{c}"] = round(n / (e - s), 2)
    # VmHWM, not getrusage: Linux carries ru_maxrss across fork + exec, so a child would report
    # at least the parent's peak (here 1.3 GB, from the bandwidth probe)
    result["peak_rss_mb"] = round(peak_rss_mib(), 1)
    return result | extra


def measure(spec: dict[str, Any], load_s: float, generate: Generate, **extra: Any) -> dict[str, Any]:
    """The shared protocol: warm up, batch-1 runs, then each concurrency level."""
    prompt, short, new = spec["prompt"], spec["short_prompts"], spec["new_tokens"]
    generate([prompt[:32]], 4)  # warm-up: first-call allocations and kernel selection
    single = [generate([prompt], new) for _ in range(spec["runs"])]
    concurrent = {}
    for c in spec["concurrency"]:
        generate(short[:c], 2)  # warm-up at this batch size
        concurrent[c] = generate(short[:c], spec["concurrent_new_tokens"])
    return summarize(spec, load_s, single, concurrent, **extra)


def run_qwen2(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from qwen2.engine.sampling import SamplingParams
    from qwen2.loading import load

    torch.set_num_threads(spec["threads"])
    kwargs = dict(quant=spec["variant"]["quant"], max_concurrency=max(spec["concurrency"], default=1),
                  prefill_chunk=max(512, len(spec["prompt"])), ctx=len(spec["prompt"]) + spec["new_tokens"] + 8)
    llm = None
    for _ in range(spec["loads"]):  # the last load is the warm one: page cache, lazy imports, allocator
        del llm
        gc.collect()
        start = time.perf_counter()
        llm = load(spec["model"], **kwargs)
        load_s = time.perf_counter() - start
    engine = llm.engine

    def generate(prompts: list[list[int]], new_tokens: int) -> Stamps:
        engine.clear_prefix_cache()  # every run computes its prompts cold
        params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
        start, first = time.perf_counter(), []

        def stamp(outputs: list) -> None:
            if outputs and not first:
                first.append(time.perf_counter())

        done = engine.run_all(prompts, [params] * len(prompts), on_step=stamp)
        return start, first[0] if first else None, time.perf_counter(), sum(len(r.output) for r, _ in done)

    return measure(spec, load_s, generate, format=describe_torch_model(llm.model), quant=llm.quant,
                   weight_bytes=torch_bytes_per_token(llm.model), kv_bytes_per_pos=engine.cache.bytes_per_token())


def describe_torch_model(model: nn.Module) -> str:
    """E.g. "bfloat16", "int4 x168 + int8 x1 linears, bfloat16 activations" or
    "GGUF blocks Q5_0 x144 + Q8_0 x13 + ..., int8 activations"."""
    from collections import Counter

    dtype = str(model.model.norm.weight.dtype).removeprefix("torch.")
    layers = [m for m in model.modules() if type(m).__name__ == "BlockLinear"]
    blocks = Counter(m.extra_repr().split(", ")[2] for m in layers)
    if blocks:
        activations = "/".join(sorted({m.activations for m in layers}))
        return f"GGUF blocks {' + '.join(f'{k} x{n}' for k, n in sorted(blocks.items()))}, {activations} activations"
    kinds = Counter(type(m).__name__.removesuffix("Linear").lower() for m in model.modules()
                    if type(m).__name__ in ("Int8Linear", "Int4Linear"))
    if not kinds:
        return dtype
    return f"{' + '.join(f'{k} x{n}' for k, n in sorted(kinds.items()))} linears, {dtype} activations"


def torch_bytes_per_token(model: nn.Module) -> int:
    """Bytes of every weight a decode step reads: all of them, except an embedding table that is
    not also the output head (a step reads only one of its rows)."""
    def tensors(module: nn.Module) -> dict[int, Any]:
        return {id(t): t for t in (*module.parameters(), *module.buffers())}

    embed, head = tensors(model.model.embed_tokens), tensors(model.lm_head)  # same paths in transformers' Qwen2
    total = sum(t.numel() * t.element_size() for t in tensors(model).values())
    if not embed.keys() & head.keys():
        total -= sum(t.numel() * t.element_size() for t in embed.values())
    return total


def run_llama_cpp(spec: dict[str, Any]) -> dict[str, Any]:
    import llama_cpp
    import numpy as np
    from gguf import GGUFReader

    threads, flash_attn = spec["threads"], spec["variant"]["flash_attn"]
    n_ctx = len(spec["prompt"]) + spec["new_tokens"] + 8
    llm = None
    for _ in range(spec["loads"]):  # as for ours: report the last (warm) load
        if llm is not None:
            llm.close()
        start = time.perf_counter()
        llm = llama_cpp.Llama(spec["model"], n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512,
                              n_ubatch=512, logits_all=False, flash_attn=flash_attn, verbose=False)
        load_s = time.perf_counter() - start
    n_vocab, model = llm.n_vocab(), llm._model.model
    # Concurrency needs its own context on the same weights: the Llama class gives one sequence.
    # kv_unified: the sequences share one pool of n_ctx cells instead of n_ctx / n_seq_max each.
    params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
    n_conc = max(spec["concurrency"], default=1)
    params.n_seq_max, params.kv_unified = n_conc, True
    params.n_ctx = n_conc * (max(map(len, spec["short_prompts"]), default=0) + spec["concurrent_new_tokens"] + 8)
    multi = llama_cpp.llama_init_from_model(model, params) if spec["concurrency"] else None
    batch = llama_cpp.llama_batch_init(512, 0, 1)

    def decode(ctx, items: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, seq_id, want_logits) items."""
        for i, (token, pos, seq, out) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, out
            batch.seq_id[i][0] = seq
        batch.n_tokens = len(items)
        if (rc := llama_cpp.llama_decode(ctx, batch)) != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def argmax(ctx, i: int) -> int:
        # llm.scores stays empty with logits_all=False in 0.3.36: read the context's logits row
        return int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).argmax())

    def generate(prompts: list[list[int]], new_tokens: int) -> Stamps:
        ctx = llm.ctx if len(prompts) == 1 else multi
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        start = time.perf_counter()
        # prefill: every prompt token with its own seq_id and position, packed 512 to a decode
        items = [(t, p, s, p == len(ids) - 1) for s, ids in enumerate(prompts) for p, t in enumerate(ids)]
        last: list[int] = []
        for i in range(0, len(items), 512):
            chunk = items[i: i + 512]
            decode(ctx, chunk)
            last += [argmax(ctx, j) for j, item in enumerate(chunk) if item[3]]
        first = time.perf_counter()
        outputs = [[t] for t in last]
        for step in range(new_tokens - 1):  # decode: one token per sequence per llama_decode
            decode(ctx, [(out[-1], len(ids) + step, s, True) for s, (ids, out) in enumerate(zip(prompts, outputs))])
            for s, out in enumerate(outputs):
                out.append(argmax(ctx, s))
        return start, first, time.perf_counter(), sum(map(len, outputs))

    reader = GGUFReader(spec["model"])
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    weight_bytes = sum(sizes.values()) - (sizes["token_embd.weight"] if "output.weight" in sizes else 0)
    n_layer, n_kv = llama_cpp.llama_model_n_layer(model), llama_cpp.llama_model_n_head_kv(model)
    head_dim = llama_cpp.llama_model_n_embd(model) // llama_cpp.llama_model_n_head(model)
    desc = ctypes_string(lambda buf, n: llama_cpp.llama_model_desc(model, buf, n))
    try:
        return measure(spec, load_s, generate, format=f"GGUF {desc}, KV f16", weight_bytes=weight_bytes,
                       kv_bytes_per_pos=2 * n_layer * n_kv * head_dim * 2,  # K and V, f16 (the default type)
                       system_info=llama_cpp.llama_print_system_info().decode().strip())
    finally:
        llama_cpp.llama_batch_free(batch)
        if multi is not None:
            llama_cpp.llama_free(multi)


def ctypes_string(fill: Callable[[Any, int], Any]) -> str:
    import ctypes

    buf = ctypes.create_string_buffer(256)
    fill(buf, len(buf))
    return buf.value.decode(errors="replace")


def run_transformers(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    torch.set_num_threads(spec["threads"])
    transformers.logging.set_verbosity_error()
    dtype = getattr(torch, spec["variant"]["dtype"])
    path = Path(spec["model"])
    # One load only: it dequantizes the whole GGUF (~25 s), a second would double the run and the peak RSS.
    # The parent read the file once, so it is in the page cache like the others'.
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()
    load_s = time.perf_counter() - start
    pad = spec["pad_token_id"]

    class Stamp(LogitsProcessor):
        """Called once per generated token; its first call marks the end of the prefill."""

        first: float | None = None

        def __call__(self, input_ids, scores):
            self.first = self.first or time.perf_counter()
            return scores

    @torch.inference_mode()
    def generate(prompts: list[list[int]], new_tokens: int) -> Stamps:
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # left-padded
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        stamp = Stamp()
        start = time.perf_counter()
        # min_new_tokens: EOS can't end a request early (it masks EOS; ours and llama.cpp just go on)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=pad, logits_processor=LogitsProcessorList([stamp]))
        end = time.perf_counter()
        return start, stamp.first, end, (out.shape[1] - width) * len(prompts)

    c = model.config
    kv = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * dtype.itemsize
    return measure(spec, load_s, generate, format=f"{spec['variant']['dtype']} (dequantized from the GGUF)",
                   weight_bytes=torch_bytes_per_token(model), kv_bytes_per_pos=kv)


RUNNERS = {"qwen2": run_qwen2, "llama.cpp": run_llama_cpp, "transformers": run_transformers}
