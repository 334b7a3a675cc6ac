"""Decode steps of fixed shape, captured once as CUDA graphs and replayed.

A decode step's shapes depend on two numbers: the batch size and the key positions it reads.
Both are rounded up to a bucket: the batch to a power of two, the keys to a power-of-two
multiple of the block size. Rows that pad a batch use slot -1, which the paged cache maps to
its padding block 0 (nobody reads it); keys past a row's own position are masked as always.
Each (batch, keys) bucket is captured into a CUDA graph the first time it is needed, with its
inputs and logits in fixed buffers, and replayed from then on: one launch instead of hundreds
of kernel launches, and no host sync inside the step.

Elsewhere (the CPU) the same fixed-shape step runs eagerly, which is what the CPU tests check.

MoE layers are captured when their experts are grouped (Transformer.fuse_weights: one grouped
GEMM per projection, no host sync) in bfloat16, the one dtype whose grouped GEMM torch runs without
reading the block sizes on the host (on Hopper and later; elsewhere the capture fails and the
engine decodes eagerly). Not covered: quantized or sharded experts (a call per expert, counted on
the host), dynamic-NTK rope and dual chunk attention (their rotation reads the longest position
on the host), models in a process group (tensor parallel or sharded: a call is a message to
other ranks, a weight may move). The engine keeps its eager decode for those; on the CPU, where
nothing is captured, the fixed-shape step runs them all but the process group. The first step
of each new bucket pays for its capture. A graph reads the weights, the key/value pools and the
block tables where they lay at capture: change them in place (the engine does), never replace them.
"""

from __future__ import annotations

import logging

import torch

from qwen2.model import MoE, PagedKVCache, Transformer

log = logging.getLogger(__name__)


def bucket(n: int, smallest: int) -> int:
    """The smallest power-of-two multiple of `smallest` that is at least n."""
    size = smallest
    while size < n:
        size *= 2
    return size


def unsupported(model: Transformer, capture: bool = True) -> str | None:
    """Why `model` cannot run a fixed-shape decode step (captured in a CUDA graph when `capture`),
    or None when it can."""
    if not isinstance(model, Transformer):
        return f"the model is a {type(model).__name__}, not a plain Transformer"
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return "the model runs in a process group"
    moe = [block.mlp for block in model.model.layers if isinstance(block.mlp, MoE)]
    if capture and moe and not all(layer.grouped for layer in moe):
        return "MoE layers with ungrouped (quantized or sharded) experts count each expert's tokens on the host"
    if capture and moe and moe[0].stacked[0].dtype != torch.bfloat16:
        return "MoE layers' grouped GEMMs read the block sizes on the host outside bfloat16"
    if model.dynamic_ntk or model.dca is not None:
        return "dynamic-NTK rope and dual chunk attention read the longest position on the host"
    return None


class StaticDecode:
    """One decode token per row through `model` over the paged `cache`, at bucketed shapes;
    replayed from CUDA graphs when `capture` (default: on CUDA), run eagerly otherwise."""

    def __init__(self, model: Transformer, cache: PagedKVCache, capture: bool | None = None, compile: bool = False):
        """compile: run the step through torch.compile first (its kernels fused; one compilation
        per bucket, minutes for a large model), then capture that."""
        self.capture = cache.k.device.type == "cuda" if capture is None else capture
        model.fuse_weights()
        reason = unsupported(model, self.capture)
        if reason:
            raise ValueError(f"fixed-shape decode steps are not available: {reason}")
        self.model, self.cache, self.device = model, cache, cache.k.device
        self.forward = torch.compile(model, dynamic=False) if compile else model
        self.max_keys = cache.tables.shape[1] * cache.block_size
        self.inputs: dict[int, torch.Tensor] = {}  # batch bucket -> (3, B): tokens, positions, slots
        self.logits: dict[int, torch.Tensor] = {}  # batch bucket -> (B, V) float32
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        # one memory pool for every graph: a replay's intermediates are dead once its logits are copied out
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None

    def buckets(self, rows: int, longest: int) -> tuple[int, int]:
        """(batch, keys) bucket of a step over `rows` rows whose largest position is `longest`."""
        return bucket(rows, 1), min(bucket(longest + 1, self.cache.block_size), self.max_keys)

    def __call__(self, tokens: list[int], positions: list[int], slots: list[int]) -> torch.Tensor:
        """Float32 logits (rows, V) on the device for each row's next token; the buffer is
        overwritten by the next call."""
        rows = len(tokens)
        batch, keys = self.buckets(rows, max(positions))
        pad = batch - rows
        host = torch.tensor([tokens + [0] * pad, positions + [0] * pad, slots + [-1] * pad])
        if batch not in self.inputs:
            self.inputs[batch] = torch.zeros_like(host, device=self.device)
            self.logits[batch] = torch.zeros(batch, self.model.config.vocab_size, device=self.device)
        self.inputs[batch].copy_(host)
        if self.capture and (batch, keys) not in self.graphs:
            self._capture(batch, keys)
        if self.capture:
            self.graphs[batch, keys].replay()
        else:
            self._run(batch, keys)
        return self.logits[batch][:rows]

    def _run(self, batch: int, keys: int) -> None:
        tokens, positions, slots = self.inputs[batch]
        logits = self.forward(tokens[:, None], positions[:, None], cache=self.cache, slots=slots, kv_len=keys)
        self.logits[batch].copy_(logits[:, 0])

    def _capture(self, batch: int, keys: int) -> None:
        # a first run outside the graph on a side stream does the lazy set-up (cuBLAS workspaces,
        # kernel selection) that a capture may not; it writes the same keys and values the replay will
        side, main = torch.cuda.Stream(self.device), torch.cuda.current_stream(self.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            self._run(batch, keys)
        main.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                self._run(batch, keys)
        except Exception:
            log.warning("capturing a decode step failed; decoding eagerly from now on", exc_info=True)
            self.capture = False
            return
        self.graphs[batch, keys] = graph
