"""`qwen2 bench`: our engine side by side with llama.cpp and transformers, one machine, one run.

    qwen2 bench [--model GGUF] [--peers qwen2,llama.cpp,transformers] [--threads N] [--json PATH] [--quick]
    python -m qwen2.bench ...

Every engine gets the same GGUF, the same token ids (tokenised once, by our tokenizer) and the same
thread count, and runs in its own subprocess, so its peak RSS is its own. Per engine: warm load
time (quantized modes: after a first start has written their on-disk cache), prefill tokens/s
(512 tokens of Wikipedia prose, time to first token, median of 3), batch-1 greedy decode tokens/s
(128 tokens after the first, median of 3), and aggregate tokens/s with 4 and
16 concurrent requests. The parent measures memory read bandwidth and turns each engine's bytes
read per decoded token into a decode roofline.

Rows: ours for `quant="auto"` and each explicit mode (bar the one auto resolved to); llama.cpp with
flash attention off and on; transformers in float32 and bfloat16. Each JSON result is the row the
peer is judged by (ours: auto; a peer: its faster decode), the other rows under its "variants".

Numbers only compare on a quiet machine: each row records how many cores other processes used
meanwhile ("other"), and torch's thread pool slows down many times over when it shares cores.
Peers: `pip install 'qwen2[bench]'`; on CPUs with AMX, build llama-cpp-python with AMX off (its AMX
matmul crashes; CMAKE_ARGS="-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF").

Not covered: GPUs (the peers' CPU paths only), sampling other than greedy, long contexts, prefix
caching, speculative decoding, torch.compile. A peer that is not installed or fails is reported as
missing with the reason, never estimated.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import inspect
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PEERS = ("qwen2", "llama.cpp", "transformers")
METRICS = ("load_s", "prefill_tps", "decode_tps", "decode_tps_c4", "decode_tps_c16", "peak_rss_mb")
# Each peer's variants, one subprocess each; --quick runs only the first.
VARIANTS: dict[str, list[dict[str, Any]]] = {
    "qwen2": [{"quant": q} for q in ("auto", "none", "int8", "int4")],
    "llama.cpp": [{"flash_attn": False}, {"flash_attn": True}],
    "transformers": [{"dtype": "float32"}, {"dtype": "bfloat16"}],
}
# Testing hook: module names the children treat as not installed (see tests/test_bench.py).
HIDE_ENV = "QWEN2_BENCH_HIDE"
# Used only when the cached Wikipedia text (qwen2.eval.data) can't be had.
FALLBACK_SENTENCES = (
    "The river rose slowly through the spring, and the farmers moved their animals to higher ground.",
    "In the city, engineers argued about whether the old stone bridge would hold another flood.",
    "A historian pointed out that it had survived three centuries of storms, wars and neglect.",
    "Meanwhile the market kept its usual hours, selling bread, cheese and the first green vegetables.",
    "Children walked along the embankment after school to watch the brown water carry branches past.",
    "At the observatory on the hill, two astronomers waited for the clouds to clear before midnight.",
    "The library extended its opening hours so that students could prepare for the winter examinations.",
    "Far to the north, a fishing fleet returned early because the forecast promised a violent storm.",
)


def variant_name(peer: str, variant: dict[str, Any]) -> str:
    return f"{peer} [{', '.join(f'{k}={v}' for k, v in variant.items())}]"


# -- the machine ---------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def memory_bandwidth_gbs(threads: int, gib: float = 1.0, repeats: int = 5) -> float:
    """Read bandwidth (GB/s) of summing a tensor far larger than the caches, best of `repeats`."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)  # touched: every page is resident
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best / 1e9


def cpu_busy_seconds() -> float:
    """CPU-seconds the whole machine has spent busy since boot (all processes, all cores)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def children_cpu_seconds() -> float:
    """CPU-seconds this process's finished children have used."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# -- the workload --------------------------------------------------------------------------
def build_workload(model: Path, prompt_tokens: int, concurrency: list[int]) -> dict[str, Any]:
    """The token ids every engine gets: one long prose prompt and distinct short prompts."""
    from qwen2.tokenizer import Tokenizer
    from qwen2.weights.gguf import read_metadata

    tokenizer = Tokenizer.from_gguf_metadata(read_metadata(model))
    try:
        from qwen2.eval.data import wiki_documents

        docs, source = wiki_documents(), "Wikipedia articles (qwen2.eval.data)"
    except Exception as e:  # no network and nothing cached: still English prose, though repetitive
        n = len(FALLBACK_SENTENCES)  # each "document" starts at a different sentence
        docs = [" ".join((FALLBACK_SENTENCES[i:] + FALLBACK_SENTENCES[:i]) * 20) for i in range(n)] * 4
        source = f"built-in prose ({type(e).__name__}: Wikipedia text unavailable)"
    prompt: list[int] = []
    for doc in docs:
        prompt += tokenizer.encode(doc + "\n\n")
        if len(prompt) >= prompt_tokens:
            break
    # short prompts of 16..31 tokens, each the start of a different article (left padding varies)
    starts = [ids for ids in (tokenizer.encode(doc[:400]) for doc in docs[1:64]) if len(ids) >= 32]
    short = [starts[i % len(starts)][:16 + i % 16] for i in range(max(concurrency, default=0))]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_ids[0]
    return {"prompt": prompt[:prompt_tokens], "short_prompts": short, "prompt_source": source, "pad_token_id": pad}


# -- runners: each runs in its own process and returns its result dict --------------------
# A runner gets the spec (model, threads, workload, sizes) and returns metrics plus
# `weight_bytes` (read per decoded token) and `kv_bytes_per_pos` for the roofline.
# Timestamps: (start, first token, end, generated tokens) for one batch of prompts.
# Batch 1: prefill_tps = prompt / (first - start), decode_tps = (tokens - 1) / (end - first).
# Concurrent (c4, c16): tokens / (end - start), prefill of the short prompts included.


def summarize(spec: dict, load_s: float, single: list[tuple], concurrent: dict[int, tuple], **extra) -> dict:
    from qwen2.eval.memory import peak_rss_mib

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


def measure(spec: dict, load_s: float, generate, **extra) -> dict:
    """The shared protocol: warm up, batch-1 runs, then each concurrency level."""
    prompt, short, new = spec["prompt"], spec["short_prompts"], spec["new_tokens"]
    generate([prompt[:32]], 4)  # warm-up: first-call allocations and kernel selection
    single = [generate([prompt], new) for _ in range(spec["runs"])]
    concurrent = {}
    for c in spec["concurrency"]:
        generate(short[:c], 2)  # warm-up at this batch size
        concurrent[c] = generate(short[:c], spec["concurrent_new_tokens"])
    return summarize(spec, load_s, single, concurrent, **extra)


def run_qwen2(spec: dict) -> dict:
    import torch

    from qwen2.engine.llm import load
    from qwen2.engine.sampling import SamplingParams

    torch.set_num_threads(spec["threads"])
    quant = spec["variant"]["quant"]
    kwargs = dict(max_slots=max(spec["concurrency"], default=1), prefill_chunk=max(512, len(spec["prompt"])),
                  max_seq_len=len(spec["prompt"]) + spec["new_tokens"] + 8)
    if "quant" in inspect.signature(load).parameters:
        kwargs["quant"] = quant
    elif quant != "auto":
        raise ModuleNotFoundError(f"this qwen2's load() takes no quant= argument, so quant={quant} can't run")
    llm = None
    for _ in range(spec["loads"]):  # the last load is the warm one: page cache, lazy imports, allocator
        del llm
        gc.collect()
        start = time.perf_counter()
        llm = load(spec["model"], **kwargs)
        load_s = time.perf_counter() - start
    engine = llm.engine

    def generate(prompts: list[list[int]], new_tokens: int) -> tuple:
        engine.clear_prefix_cache()  # every run computes its prompts cold
        params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
        start, first = time.perf_counter(), None
        requests = [engine.submit(p, params) for p in prompts]
        while engine.has_work:
            if engine.step() and first is None:
                first = time.perf_counter()
        return start, first, time.perf_counter(), sum(len(r.output) for r in requests)

    return measure(spec, load_s, generate, format=describe_torch_model(llm.model), quant=quant_mode(llm.model),
                   weight_bytes=torch_bytes_per_token(llm.model), kv_bytes_per_pos=engine.cache.bytes_per_token())


def prime_quantized_cache(model: Path, quant: str) -> None:
    """One start in a throwaway process, so the measured starts find the quantized weights cached
    (qwen2.weights.quantized), as a user's second start does, and the row's peak RSS is a warm start's."""
    code = f"from qwen2.engine.llm import load; load({str(model)!r}, quant={quant!r})"
    subprocess.run([sys.executable, "-c", code], capture_output=True, check=False)


def describe_torch_model(model) -> str:
    """E.g. "bfloat16" or "int4 x168 + int8 x1 linears, bfloat16 activations"."""
    from collections import Counter

    dtype = str(model.model.embed_tokens.weight.dtype).removeprefix("torch.")
    kinds = Counter(type(m).__name__.removesuffix("Linear").lower() for m in model.modules()
                    if type(m).__name__ in ("Int8Linear", "Int4Linear"))
    if not kinds:
        return dtype
    return f"{' + '.join(f'{k} x{n}' for k, n in sorted(kinds.items()))} linears, {dtype} activations"


def quant_mode(model) -> str:
    """What a quant= request became: "int4", "int8" or "none" (int4 falls back to int8 per layer)."""
    names = {type(m).__name__ for m in model.modules()}
    return "int4" if "Int4Linear" in names else "int8" if "Int8Linear" in names else "none"


def torch_bytes_per_token(model) -> int:
    """Bytes of every weight a decode step reads: all of them, except an embedding table that is
    not also the output head (a step reads only one of its rows)."""
    embed = model.model.embed_tokens.weight  # the same attribute path in ours and transformers' Qwen2
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if getattr(model.lm_head, "weight", None) is not embed:
        total -= embed.numel() * embed.element_size()
    return total


def run_llama_cpp(spec: dict) -> dict:
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

    def generate(prompts: list[list[int]], new_tokens: int) -> tuple:
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


def ctypes_string(fill) -> str:
    import ctypes

    buf = ctypes.create_string_buffer(256)
    fill(buf, len(buf))
    return buf.value.decode(errors="replace")


def run_transformers(spec: dict) -> dict:
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
    def generate(prompts: list[list[int]], new_tokens: int) -> tuple:
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


def child_main(spec_path: str) -> None:
    """Entry of a runner subprocess: read the spec, run, write the result (or why it's missing)."""
    for name in filter(None, os.environ.get(HIDE_ENV, "").split(",")):
        sys.modules[name] = None  # `import name` now raises ImportError, as if it were not installed
    spec = json.loads(Path(spec_path).read_text())
    try:
        result = RUNNERS[spec["peer"]](spec)
    except ImportError as e:  # ModuleNotFoundError included: the peer can't run here
        result = {"missing": f"not available: {e} (pip install 'qwen2[bench]')"}
    Path(spec["result"]).write_text(json.dumps(result))


# -- the parent: one subprocess per row ----------------------------------------------------
def run_row(spec: dict, threads: int, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        spec = spec | {"result": str(Path(tmp) / "result.json")}
        (Path(tmp) / "spec.json").write_text(json.dumps(spec))
        env = os.environ | {"OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
        cmd = [sys.executable, "-m", "qwen2.bench", "--child", str(Path(tmp) / "spec.json")]
        # Other processes' CPU use during the row: the machine's busy time minus the child's own.
        # On a shared machine it explains a slow row (torch's thread pool suffers most from it).
        busy, own, wall = cpu_busy_seconds(), children_cpu_seconds(), time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"missing": f"failed: ran past {timeout:.0f} s"}
        others = (cpu_busy_seconds() - busy) - (children_cpu_seconds() - own)
        if proc.returncode == 0 and Path(spec["result"]).exists():
            result = json.loads(Path(spec["result"]).read_text())
            return result | {"other_cpu_cores": round(max(others, 0.0) / (time.perf_counter() - wall), 2)}
        said = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        return {"missing": f"failed ({how}): {said}"}


def roofline(result: dict, bandwidth_gbs: float, context: float) -> dict:
    """Batch-1 decode ceiling: bytes read per token (weights + KV at the mean decode length) / bandwidth."""
    if "weight_bytes" not in result or result.get("decode_tps") is None:
        return {}
    per_token = result["weight_bytes"] + result["kv_bytes_per_pos"] * context
    ceiling = bandwidth_gbs * 1e9 / per_token
    return {"bytes_per_token": int(per_token), "roofline_tps": round(ceiling, 2),
            "achieved_gbs": round(result["decode_tps"] * per_token / 1e9, 2),
            "roofline_frac": round(result["decode_tps"] / ceiling, 3)}


def pick(peer: str, rows: dict[str, dict]) -> dict:
    """The row a peer is judged by: ours as `load()` gives it (auto), a peer's faster decode."""
    measured = {k: r for k, r in rows.items() if "missing" not in r}
    if not measured:
        return dict.fromkeys(METRICS) | {"missing": "; ".join(f"{k}: {r['missing']}" for k, r in rows.items())}
    if peer == "qwen2":
        key = next(iter(rows))
        if "missing" in rows[key]:
            return dict.fromkeys(METRICS) | rows[key]
    else:
        key = max(measured, key=lambda k: measured[k]["decode_tps"])
    chosen = dict.fromkeys(METRICS) | rows[key] | {"variant": key}
    others = {k: r for k, r in rows.items() if k != key}
    return chosen | ({"variants": others} if others else {})


def fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def print_report(machine: dict, rows: dict[str, dict[str, dict]], results: dict[str, dict]) -> None:
    m = machine
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads for every engine; "
          f"memory read bandwidth {m['bandwidth_gbs']:.1f} GB/s ({m['bandwidth_method']})")
    print(f"software: torch {m['torch']}, llama-cpp-python {m['llama_cpp_python']} "
          f"({m.get('llama_cpp_build', 'not run')}), transformers {m['transformers']}; native bf16: {m['native_bf16']}")
    print(f"model: {m['model']}")
    print(f"workload: prefill {m['prompt_tokens']} tokens of {m['prompt_source']}; decode {m['new_tokens']} greedy "
          f"tokens at batch 1 (median of {m['runs']}); c4/c16: {m['concurrent_new_tokens']} tokens each for "
          f"prompts of {m['short_prompt_tokens']} tokens, all tokens / wall time incl. prefill")
    print(f"roofline: bandwidth / (weights read per token + KV at {m['roofline_context']:.0f} positions);"
          " GB/s: decode tok/s x those bytes; other: cores other processes used during the row\n")
    print(f"{'':<34}{'':>7}{'tok/s':>9}{'tok/s':>8}{'tok/s':>8}{'tok/s':>8}{'':>8}{'tok/s':>7}{'':>13}{'cores':>6}")
    head = (f"{'engine':<34}{'load s':>7}{'prefill':>9}{'decode':>8}{'c4':>8}{'c16':>8}{'RSS MB':>8}"
            f"{'roof':>7}{'% roof':>7}{'GB/s':>6}{'other':>6}  format")
    print(head + "\n" + "-" * len(head))
    for variants in rows.values():
        for name, r in variants.items():
            if "missing" in r:
                print(f"{name:<34}missing: {r['missing']}")
                continue
            roof = r.get("roofline") or {}
            print(f"{name:<34}{fmt(r['load_s'], 2):>7}{fmt(r['prefill_tps']):>9}{fmt(r['decode_tps']):>8}"
                  f"{fmt(r.get('decode_tps_c4')):>8}{fmt(r.get('decode_tps_c16')):>8}{fmt(r['peak_rss_mb'], 0):>8}"
                  f"{fmt(roof.get('roofline_tps')):>7}{fmt(100 * roof['roofline_frac'] if roof else None, 0):>7}"
                  f"{fmt(roof.get('achieved_gbs')):>6}{fmt(r.get('other_cpu_cores'), 2):>6}  {r.get('format', '')}")
    busiest = max((r.get("other_cpu_cores") or 0 for v in rows.values() for r in v.values()), default=0)
    if busiest > 0.2:
        print(f"WARNING: other processes kept up to {busiest:.2f} cores busy during a run (column 'other'); "
              "engines that ran at different times are not comparable: rerun on a quiet machine")
    # ours / peer on every throughput metric, against the row each peer is judged by
    ours = results["qwen2"]
    print(f"\n{'qwen2 / peer (> 1: ours faster)':<34}{'prefill':>16}{'decode':>8}{'c4':>8}{'c16':>8}  peer row")
    for peer in PEERS[1:]:
        theirs = results[peer]
        if ours.get("missing") or theirs.get("missing"):
            print(f"{'vs ' + peer:<34}{'missing':>16}")
            continue
        ratios = [ours[k] / theirs[k] if ours.get(k) and theirs.get(k) else None for k in METRICS[1:5]]
        print(f"{'vs ' + peer:<34}{fmt(ratios[0], 2):>16}" + "".join(f"{fmt(x, 2):>8}" for x in ratios[1:])
              + f"  {theirs['variant']}")


# -- command line --------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", help="a .gguf file or a packed model's name "
                        "(default: the embedded Qwen2.5-Coder-0.5B-Instruct)")
    parser.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated subset of {','.join(PEERS)}")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="threads for every engine (default: the cores this process may use)")
    parser.add_argument("--json", metavar="PATH", help="also write {machine, results} to PATH")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 64-token prompt, 16 new tokens, "
                        "c4 only, one load and one run, first variant only")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds each engine run may take")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one engine from a spec file


def resolve_model(spec: str | None) -> Path:
    """The GGUF every engine reads: a path, a packed model's name, or the default."""
    from qwen2.errors import Qwen2Error
    from qwen2.weights.default import PACKED_MODELS, default_model_path, packed_model_path

    if spec is None:
        return default_model_path()
    path = packed_model_path(PACKED_MODELS[spec.lower()]) if spec.lower() in PACKED_MODELS else Path(spec)
    if path.suffix != ".gguf" or not path.is_file():
        raise Qwen2Error(f"{spec} is not a .gguf file or a packed model; every engine reads the same GGUF")
    return path


def run(args: argparse.Namespace) -> dict:
    """Run every requested engine and print the report; returns {machine, results}."""
    if getattr(args, "child", None):
        child_main(args.child)
        return {}
    import torch

    from qwen2.device import cpu_has_native_bf16
    from qwen2.errors import Qwen2Error

    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    if unknown := set(peers) - set(PEERS):
        raise Qwen2Error(f"unknown peer(s) {', '.join(sorted(unknown))}; choose from {', '.join(PEERS)}")
    model = resolve_model(args.model)
    prompt_tokens, new_tokens, concurrency, runs = (64, 16, [4], 1) if args.quick else (512, 128, [4, 16], 3)
    conc_new_tokens = 16 if args.quick else 64
    workload = build_workload(model, prompt_tokens, concurrency)
    with model.open("rb") as f:  # into the page cache, so every engine's load is a warm one
        while f.read(1 << 24):
            pass
    gib, repeats = (0.5, 3) if args.quick else (1.0, 5)
    short_lens = sorted(map(len, workload["short_prompts"]))
    machine = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads, "platform": platform.platform(),
        "torch": torch.__version__, "llama_cpp_python": package_version("llama_cpp_python"),
        "transformers": package_version("transformers"), "native_bf16": cpu_has_native_bf16(),
        "bandwidth_gbs": None,  # the best of the samples, filled in below
        "bandwidth_method": f"torch sum of {gib} GiB float32, {args.threads} threads, best of {repeats}, "
                            "before every engine; the best sample counts",
        "model": str(model), "prompt_tokens": len(workload["prompt"]), "prompt_source": workload["prompt_source"],
        "new_tokens": new_tokens, "runs": runs, "concurrency": concurrency, "concurrent_new_tokens": conc_new_tokens,
        "short_prompt_tokens": f"{short_lens[0]}-{short_lens[-1]}" if short_lens else None,
        "roofline_context": len(workload["prompt"]) + new_tokens / 2,  # the mean KV length while decoding
    }
    base = {"model": str(model), "threads": args.threads, "runs": runs, "loads": 1 if args.quick else 2,
            "concurrency": concurrency, "new_tokens": new_tokens, "concurrent_new_tokens": conc_new_tokens, **workload}
    # `kill` of this process ends the running child too: SystemExit unwinds subprocess.run, which kills it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    rows: dict[str, dict[str, dict]] = {}
    # Sampled before every row: a busy neighbour lowers a sample, and the ceiling is the best one.
    samples = [memory_bandwidth_gbs(args.threads, gib, repeats)]
    for peer in peers:
        rows[peer] = {}
        for variant in VARIANTS[peer][:1] if args.quick else VARIANTS[peer]:
            name = variant_name(peer, variant)
            auto = rows[peer].get(variant_name(peer, {"quant": "auto"}), {})
            if "quant" in variant and variant["quant"] == auto.get("quant"):
                continue  # the explicit mode auto resolved to: the auto row already shows it
            print(f"running {name} ...", file=sys.stderr, flush=True)
            if peer == "qwen2" and variant["quant"] != "none":
                prime_quantized_cache(model, variant["quant"])
            samples.append(memory_bandwidth_gbs(args.threads, gib, repeats))
            start = time.perf_counter()
            r = rows[peer][name] = run_row(base | {"peer": peer, "variant": variant}, args.threads, args.timeout)
            print(f"  {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
            if "system_info" in r:  # llama.cpp's compiled-in CPU features
                machine["llama_cpp_build"] = "AMX on" if "AMX" in r["system_info"] else "AMX off"
                machine["llama_cpp_system_info"] = r["system_info"]
    machine["bandwidth_gbs"] = round(max(samples), 2)
    machine["bandwidth_samples_gbs"] = [round(x, 1) for x in samples]
    for r in (r for variants in rows.values() for r in variants.values() if "missing" not in r):
        r["roofline"] = roofline(r, machine["bandwidth_gbs"], machine["roofline_context"])
    not_run = dict.fromkeys(METRICS) | {"missing": "not requested (--peers)"}
    results = {peer: pick(peer, rows[peer]) if peer in rows else not_run for peer in PEERS}
    print_report(machine, rows, results)
    report = {"machine": machine, "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="qwen2 bench", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    from qwen2.errors import Qwen2Error

    try:
        run(args)
    except Qwen2Error as e:
        print(f"qwen2 bench: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
