"""The Qwen2 network, dense and mixture-of-experts, top to bottom.

config -> RMSNorm -> rotary -> Attention (GQA, q/k/v bias, sliding window) -> MLP (SwiGLU)
/ MoE (router, experts, shared expert) -> Block -> Transformer.

Every token carries its own absolute position, so one forward serves a prompt, a batch of
prompts of different lengths (right-padded: a pad sits at a later position than any real
token, so the causal rule already hides it), and one decode step per sequence of a batch.
The model knows nothing of files, tokenizers or scheduling; it reads and writes a KVCache
that its caller owns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qwen2.config import Qwen2Config
from qwen2.dca import DCAConfig, dca_attention, dca_key_rotation
from qwen2.errors import ConfigError, WeightsError
from qwen2.rope import apply_rotary, dynamic_inv_freq, rope_parameters, rope_type, rotary_cos_sin

DECODE_ROWS = 16  # query rows up to which CPU attention runs in float32 (decode, speculative checks)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 == self.weight.dtype:  # one kernel, not seven: decode runs 49 of these a token
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # normalise in float32 (one fused kernel), cast back before the weight, as the reference does
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)


def stack_in_place(params: list[torch.Tensor]) -> torch.Tensor:
    """One tensor holding `params` one after another along dim 0, each parameter now a view of
    it: one GEMM reads them all, and they stay the same objects (an optimizer's or a state dict's
    references hold, and in-place updates land in the stack)."""
    with torch.no_grad():
        stacked = torch.cat(params)
        start = 0
        for p in params:
            p.data, start = stacked[start:start + p.shape[0]], start + p.shape[0]
    return stacked


def views_of(stacked: torch.Tensor | None, params: list[torch.Tensor]) -> bool:
    """Whether `params` still view `stacked` (moving a model to another device or dtype gives
    them storage of their own)."""
    return (stacked is not None and params[0].data_ptr() == stacked.data_ptr()
            and params[-1].data_ptr() == stacked[len(stacked) - len(params[-1]):].data_ptr())


def plain(*linears: nn.Module) -> bool:
    """Float nn.Linear layers with no forward hooks (adapters), whose weights may be stacked."""
    return all(type(m) is nn.Linear and not m._forward_hooks and not m.weight.is_meta for m in linears)


class KVCache:
    """Preallocated keys and values of every layer: (layers, slots, n_kv, max_len, head_dim).

    A slot holds one sequence; the token at position p lives at index p. Used where one or a
    few sequences run alone (perplexity windows, a draft model); the engine uses PagedKVCache.
    """

    def __init__(self, config: Qwen2Config, slots: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (config.num_hidden_layers, slots, config.num_key_value_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    def bytes_per_token(self) -> int:
        layers, _, n_kv, _, hd = self.k.shape
        return 2 * layers * n_kv * hd * self.k.element_size()

    def locate(self, slots: torch.Tensor | None, positions: torch.Tensor, kv_len: int) -> tuple:
        """Where one forward's tokens go, worked out once for all layers: the slot of each row."""
        return slots, positions

    def update(self, layer: int, where: tuple, k: torch.Tensor, v: torch.Tensor,
               kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv, T, hd) where `locate` said; return each row's first kv_len entries."""
        slots, positions = where
        ck, cv = self.k[layer], self.v[layer]
        rows = torch.arange(k.shape[0], device=k.device) if slots is None else slots
        ck[rows[:, None], :, positions] = k.transpose(1, 2)  # (B, T, n_kv, hd)
        cv[rows[:, None], :, positions] = v.transpose(1, 2)
        if slots is None:
            return ck[: k.shape[0], :, :kv_len], cv[: k.shape[0], :, :kv_len]
        return ck[slots, :, :kv_len], cv[slots, :, :kv_len]


class PagedKVCache:
    """Keys and values of every layer in one pool of fixed-size blocks: (layers, blocks, block_size, n_kv, hd).

    Row r of `tables` lists, in position order, the blocks of the sequence in slot r: the token
    at position p lives in block tables[r, p // block_size] at offset p % block_size. Entries
    past a sequence's blocks name block 0, which belongs to nobody: padding writes land there,
    and what it holds sits at positions the causal mask hides. Which block is whose, and which
    blocks several sequences share, is the engine's business (qwen2.engine.paged).
    """

    def __init__(self, config: Qwen2Config, blocks: int, block_size: int, slots: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (config.num_hidden_layers, blocks, block_size, config.num_key_value_heads, config.head_dim)
        # empty, not zeros: the OS maps pages as they are first written, so a large budget costs
        # memory only as it fills; a block is zeroed when handed out (stale NaNs would leak
        # through masked attention as 0 * NaN)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.block_size, self.max_len = block_size, max_len
        self.tables = torch.zeros(slots, -(-max_len // block_size), dtype=torch.long, device=device)
        self.zero_blocks([0])

    @property
    def slots(self) -> int:
        return self.tables.shape[0]

    @property
    def blocks(self) -> int:
        return self.k.shape[1]

    def bytes_per_token(self) -> int:
        layers, _, _, n_kv, hd = self.k.shape
        return 2 * layers * n_kv * hd * self.k.element_size()

    def zero_blocks(self, blocks: list[int]) -> None:
        for block in blocks:  # a view's fill, not an indexed write: a third less of a new block's cost
            self.k[:, block].zero_()
            self.v[:, block].zero_()

    def copy_prefix(self, source: int, target: int, tokens: int) -> None:
        """Copy the first `tokens` entries of block `source` into block `target` (every layer)."""
        self.k[:, target, :tokens] = self.k[:, source, :tokens]
        self.v[:, target, :tokens] = self.v[:, source, :tokens]

    def locate(self, slots: torch.Tensor | None, positions: torch.Tensor, kv_len: int) -> tuple:
        """Where one forward's tokens go and which blocks it reads, worked out once for all layers.
        A negative slot reads and writes block 0 only: a row padding a batch to a fixed size."""
        if slots is None:
            tables = self.tables[: positions.shape[0]]
        else:
            tables = self.tables[slots.clamp(min=0)].masked_fill((slots < 0)[:, None], 0)
        flat = tables.gather(1, positions // self.block_size) * self.block_size + positions % self.block_size
        return flat.reshape(-1), tables[:, : -(-kv_len // self.block_size)]

    def update(self, layer: int, where: tuple, k: torch.Tensor, v: torch.Tensor,
               kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv, T, hd) where `locate` said; return each row's first kv_len entries
        gathered from its blocks, (B, n_kv, kv_len, hd)."""
        flat, tables = where
        B, n_kv, T, hd = k.shape
        out = []
        for pool, new in ((self.k[layer], k), (self.v[layer], v)):
            pool.view(-1, n_kv, hd).index_copy_(0, flat, new.transpose(1, 2).reshape(B * T, n_kv, hd))
            # index_select, not pool[tables]: advanced indexing ran 1000x slower here on a large pool
            blocks = pool.index_select(0, tables.reshape(-1)).view(B, -1, n_kv, hd)
            out.append(blocks[:, :kv_len].transpose(1, 2))  # (B, n_kv, kv_len, hd)
        return out[0], out[1]


@dataclass
class Context:
    """What every layer of one forward shares."""

    positions: torch.Tensor  # (B, T) absolute position of each token
    key_positions: torch.Tensor  # (B or 1, S) position of each key attended to
    cos: torch.Tensor
    sin: torch.Tensor
    inv_freq: torch.Tensor
    attention_scaling: float
    masks: dict[int | None, torch.Tensor]  # by sliding window (None: full causal)
    cache: KVCache | PagedKVCache | None
    where: tuple | None  # the cache's addressing of this forward's tokens (its `locate`)
    kv_len: int
    dca: DCAConfig | None
    router_logits: list[torch.Tensor] | None
    # a decode step's attention (rotary, the paged cache's write and read) in fused kernels, set by a
    # decode step that has them (qwen2.engine.triton_decode)
    decode_attention: Callable | None = None


class Attention(nn.Module):
    def __init__(self, config: Qwen2Config, layer: int):
        super().__init__()
        self.layer, self.window = layer, config.layer_window(layer)
        self.n_heads, self.n_kv, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        h, q, kv = config.hidden_size, self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.q_proj = nn.Linear(h, q, bias=config.qkv_bias)
        self.k_proj = nn.Linear(h, kv, bias=config.qkv_bias)
        self.v_proj = nn.Linear(h, kv, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q, h, bias=False)
        self.qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None  # see fuse()

    def fuse(self) -> bool:
        """Stack the q, k and v projections (stack_in_place) for one GEMM instead of three."""
        linears = (self.q_proj, self.k_proj, self.v_proj)
        if not plain(*linears):
            return False
        if not self.fused:
            biases = [m.bias for m in linears]
            self.qkv = (stack_in_place([m.weight for m in linears]),
                        None if biases[0] is None else stack_in_place(biases))
        return True

    @property
    def fused(self) -> bool:
        return (self.qkv is not None and plain(self.q_proj, self.k_proj, self.v_proj)
                and views_of(self.qkv[0], [self.q_proj.weight, self.v_proj.weight])
                and (self.qkv[1] is None or views_of(self.qkv[1], [self.q_proj.bias, self.v_proj.bias])))

    def forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        # autograd reaches the parameters only through their own modules, not the stack
        if not torch.is_grad_enabled() and self.fused:
            q, k, v = F.linear(x, *self.qkv).split([self.n_heads * self.head_dim, self.n_kv * self.head_dim,
                                                     self.n_kv * self.head_dim], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.o_proj(self.attend(q, k, v, ctx))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: Context) -> torch.Tensor:
        """Projected q (B, T, nh*hd), k and v (B, T, n_kv*hd) -> attention's output (B, T, nh*hd), before
        o_proj: rotary, the cache's write and read, the attention itself."""
        B, T, _ = q.shape
        if ctx.decode_attention is not None:
            return ctx.decode_attention(self.layer, q, k, v, ctx)
        q, k, v = self.rotate_and_cache(q, k, v, ctx)
        if ctx.dca is not None:
            y = dca_attention(q, k, v, ctx.positions, ctx.key_positions.expand(B, -1), ctx.inv_freq,
                              ctx.attention_scaling, ctx.dca)
            return y.transpose(1, 2).reshape(B, T, -1)
        gqa = self.n_kv != self.n_heads
        if T == 1 and gqa:
            # one query row: each KV head's query group becomes rows of that head, so keys and values
            # are read once (with a mask, enable_gqa can fall back to a kernel that copies them per head)
            q, gqa = q.reshape(B, self.n_kv, -1, self.head_dim), False
        mask = ctx.masks[self.window]  # None: plain causal, which the kernel skips blocks of rather than reads
        if q.device.type == "cpu" and T <= DECODE_ROWS and q.dtype != torch.float32:
            # torch's reduced-precision CPU attention kernel costs ~14x the float32 one for a few
            # query rows (819 vs 58 us at 520 keys, bench/RESULTS.md); decode reads little, so upcast
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                               is_causal=mask is None, enable_gqa=gqa).to(q.dtype)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
        return y.reshape(B, self.n_heads, T, self.head_dim).transpose(1, 2).reshape(B, T, -1)

    def rotate_and_cache(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         ctx: Context) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projected q (B, T, nh*hd), k and v (B, T, n_kv*hd) -> q (B, nh, T, hd) rotated, and the keys and
        values it attends to (B, n_kv, S, hd): with a cache, this chunk's are written there and all read back."""
        B, T, _ = q.shape
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if ctx.dca is not None:
            # keys are stored rotated at their chunk-local position; queries rotate per chunk distance
            k = dca_key_rotation(k, ctx.positions, ctx.inv_freq, ctx.attention_scaling, ctx.dca)
        else:
            q, k = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer, ctx.where, k, v, ctx.kv_len)
        return q, k, v


class MLP(nn.Module):
    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)
        self.gate_up: torch.Tensor | None = None  # see fuse()

    def fuse(self) -> bool:
        """Stack the gate and up projections (stack_in_place) for one GEMM instead of two."""
        if not plain(self.gate_proj, self.up_proj):
            return False
        if not self.fused:
            self.gate_up = stack_in_place([self.gate_proj.weight, self.up_proj.weight])
        return True

    @property
    def fused(self) -> bool:
        return plain(self.gate_proj, self.up_proj) and views_of(self.gate_up, [self.gate_proj.weight,
                                                                              self.up_proj.weight])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() and self.fused:
            gate, up = F.linear(x, self.gate_up).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class MoE(nn.Module):
    """Qwen2-MoE block: softmax router over all experts, top-k, plus a sigmoid-gated shared expert.

    The k (token, expert) pairs of every token are sorted by expert, so each expert runs once over
    its block of rows. Float experts can be grouped (`group_experts`): their matrices move into two
    stacked tensors that the experts' own parameters then view, and one grouped GEMM per projection
    runs every block with no host sync (fixed shapes: N*k rows), which a CUDA graph can capture.
    Otherwise (quantized experts, training, a sharded layer) a loop calls each expert on its block,
    after one host sync for the block sizes. Int8 block experts (qwen2.quant) run a decode step's
    few rows through one compiled call instead, where the loader sets `fused_experts`. Under expert
    parallelism (qwen2.distributed.expert_parallel) `dispatch` sends the sorted rows to the processes
    that hold their experts and brings their outputs back.
    """

    def __init__(self, config: Qwen2Config):
        super().__init__()
        h = config.hidden_size
        self.num_experts, self.top_k, self.norm_topk_prob = (
            config.num_experts, config.num_experts_per_tok, config.norm_topk_prob)
        self.gate = nn.Linear(h, config.num_experts, bias=False)
        # keyed by expert number (the state-dict names a list would give): a sharded layer holds a subset
        self.experts = nn.ModuleDict({str(e): MLP(h, config.moe_intermediate_size) for e in range(config.num_experts)})
        self.shared_expert = MLP(h, config.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(h, 1, bias=False)
        self.stacked: tuple[torch.Tensor, torch.Tensor] | None = None  # (E, 2I, H) gate;up and (E, H, I) down
        self.fused_experts = None  # qwen2.quant.fused_moe.FusedExperts, where the experts are its kind
        self.dispatch = None  # qwen2.distributed.expert_parallel.ExpertDispatch, where processes share the experts

    def group_experts(self) -> bool:
        """Move the experts' float matrices into stacked tensors (see the class); True when grouped.
        The parameters stay the same objects (an optimizer's references hold), each now a view."""
        if self.grouped:
            return True
        self.stacked = None  # stale stacks (the experts moved or were quantized) hold memory for nothing
        if len(self.experts) < self.num_experts:
            return False  # tensor parallelism holds a subset here; the loop skips the others' experts
        mlps = [self.experts[str(e)] for e in range(self.num_experts)]
        if not plain(*(p for m in mlps for p in (m.gate_proj, m.up_proj, m.down_proj))):
            return False  # quantized experts run their own kernels
        width, hidden = mlps[0].gate_proj.weight.shape
        size = mlps[0].gate_proj.weight.element_size()
        if width * size % 16 or hidden * size % 16:
            return False  # grouped GEMMs need rows aligned to 16 bytes
        gate_up = stack_in_place([w for m in mlps for w in (m.gate_proj.weight, m.up_proj.weight)])
        down = stack_in_place([m.down_proj.weight for m in mlps])
        self.stacked = gate_up.view(self.num_experts, 2 * width, hidden), down.view(self.num_experts, hidden, width)
        return True

    @property
    def grouped(self) -> bool:
        """Whether the stacked tensors are still what the experts' parameters view (moving the
        model to another device or dtype gives them new storage)."""
        if self.stacked is None:
            return False
        first, last = self.experts["0"], self.experts[str(self.num_experts - 1)]
        return (plain(first.gate_proj, last.up_proj, last.down_proj)
                and views_of(self.stacked[0].flatten(0, 1), [first.gate_proj.weight, last.up_proj.weight])
                and views_of(self.stacked[1].flatten(0, 1), [first.down_proj.weight, last.down_proj.weight]))

    def forward(self, x: torch.Tensor, ctx: Context | None = None) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, H)
        logits = self.gate(x)
        if ctx is not None and ctx.router_logits is not None:
            ctx.router_logits.append(logits)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # (N, k)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        if self.fused_experts is not None and self.fused_experts.applies(x):
            out = self.fused_experts(x, chosen, weights)
        else:
            out = self._routed(x, chosen, weights)
        out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.view(shape)

    def _routed(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The chosen experts' outputs (N, H) weighted and summed over each token's k slots."""
        experts, order = chosen.flatten().sort(stable=True)  # the (token, slot) pairs by expert
        # where each expert's block ends (bincount would read the largest id on the host)
        ends = torch.searchsorted(experts, torch.arange(self.num_experts, device=x.device), right=True)
        rows = x[order // self.top_k]
        if self.dispatch is not None:
            out = self.dispatch(self, rows, ends)
        # autograd reaches the experts' parameters only through their own modules, not the stacks
        elif not torch.is_grad_enabled() and self.grouped:
            gate_up, down = self.stacked
            ends = ends.to(torch.int32)
            gate, up = F.grouped_mm(rows, gate_up.transpose(1, 2), offs=ends).chunk(2, dim=-1)
            out = F.grouped_mm(F.silu(gate) * up, down.transpose(1, 2), offs=ends)
        else:
            out = self.per_expert(rows, ends)
        # back to (token, slot) order; the k slots summed in a fixed order (index_add_ on CUDA is not)
        out = torch.empty_like(out).index_copy_(0, order, out).view(-1, self.top_k, x.shape[-1])
        return (out * weights.to(x.dtype)[..., None]).sum(1)

    def per_expert(self, rows: torch.Tensor, ends: torch.Tensor | list[int]) -> torch.Tensor:
        """Each expert on its block of `rows` (sorted by expert), one call each."""
        out = torch.zeros_like(rows)
        start = 0
        for e, end in enumerate(ends.tolist() if isinstance(ends, torch.Tensor) else ends):  # the one host sync
            if end > start and str(e) in self.experts:  # another shard of a layer adds its experts' part
                out[start:end] = self.experts[str(e)](rows[start:end])
            start = end
        return out


class Block(nn.Module):
    def __init__(self, config: Qwen2Config, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        sparse = config.layer_is_sparse(layer)
        self.mlp = MoE(config) if sparse else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, ctx) if isinstance(self.mlp, MoE) else self.mlp(h))


class _Body(nn.Module):
    """Holds the parameters under the `model.` prefix, so our names equal the HF names."""

    def __init__(self, config: Qwen2Config):
        super().__init__()
        shape = (config.vocab_size, config.hidden_size)
        if torch.empty(0).is_meta:  # loading: random init of a meta embedding imports torch._dynamo (1.5 s)
            self.embed_tokens = nn.Embedding.from_pretrained(torch.empty(shape), freeze=False)
        else:
            self.embed_tokens = nn.Embedding(*shape)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


def attention_mask(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None,
                   segments: torch.Tensor | None = None) -> torch.Tensor:
    """Bool (B, 1, T, S): a query sees keys at its own or earlier positions (within the window)
    and, when `segments` (B, T) numbers the samples packed into a row, of its own sample only."""
    q, k = query_pos[:, :, None], key_pos[:, None, :]
    allowed = k <= q
    if window is not None:
        allowed &= k > q - window
    if segments is not None:
        allowed &= segments[:, :, None] == segments[:, None, :]
    return allowed[:, None]


class Transformer(nn.Module):
    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.config = config
        self.model = _Body(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.decode_step = None  # the layers of a decode step as fused calls, where the loader finds them apt
        self.prefill_step = None  # the layers of a many-row forward as fused GEMMs, likewise
        self.argmax_rows = None  # float32 logits (B, V) -> each row's first largest (B,), a compiled scan, likewise
        self.set_rope(config)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def set_rope(self, config: Qwen2Config) -> None:
        """(Re)derive rotary frequencies, e.g. after a rope_scaling or DCA override."""
        self.config = config
        with torch.device("cpu"):  # never on meta: meta arithmetic imports torch._dynamo (1.5 s)
            inv_freq, self.attention_scaling = rope_parameters(config)
        self.register_buffer("inv_freq", inv_freq.to(self.model.embed_tokens.weight.device), persistent=False)
        self.dynamic_ntk = rope_type(config) == "dynamic"
        dca = config.dual_chunk_attention_config
        self.dca = DCAConfig.from_dict(dca) if dca else None
        if self.dca and any(config.layer_window(i) for i in range(config.num_hidden_layers)):
            raise ConfigError("dual chunk attention cannot be combined with sliding-window layers")

    def fuse_weights(self) -> list[int]:
        """For inference: stack each layer's q/k/v and gate/up float matrices into one GEMM each,
        and group each MoE layer's float experts for dispatch without host syncs; the parameters
        stay what they were, now views (stack_in_place). Returns the MoE layers whose experts stay
        one call each (quantized or sharded)."""
        ungrouped = []
        for i, block in enumerate(self.model.layers):
            block.self_attn.fuse()
            if isinstance(block.mlp, MoE):
                block.mlp.shared_expert.fuse()
                if not block.mlp.group_experts():
                    ungrouped.append(i)
            else:
                block.mlp.fuse()
        return ungrouped

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | PagedKVCache | None = None, slots: torch.Tensor | None = None,
                logits_index: torch.Tensor | None = None,
                router_logits: list[torch.Tensor] | None = None, kv_len: int | None = None,
                logits_rows: torch.Tensor | None = None) -> torch.Tensor:
        """tokens, positions (B, T) -> logits (B, T, V), or (B, V) at `logits_index` (B,), or only
        those of the rows `logits_rows` (N,) of that.

        With a cache, keys come from the cache slots (`slots` (B,), default rows 0..B-1; a
        PagedKVCache reads the blocks its block table lists for each slot);
        without one, the call attends within `tokens` only. MoE layers append their router
        logits to `router_logits` when a list is given. `kv_len`, with a cache, fixes how many
        key positions every row reads (at least the largest position + 1): shapes then depend on
        no tensor's values, so the call needs no host sync and can be captured in a CUDA graph.
        """
        x = self.body(tokens, positions, cache, slots, router_logits, kv_len=kv_len)
        if logits_index is not None:
            x = x[torch.arange(x.shape[0], device=x.device), logits_index]  # (B, H)
            if logits_rows is not None:
                x = x[logits_rows]
        return self.lm_head(self.model.norm(x))

    def body(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
             cache: KVCache | PagedKVCache | None = None,
             slots: torch.Tensor | None = None, router_logits: list[torch.Tensor] | None = None,
             segments: torch.Tensor | None = None, kv_len: int | None = None) -> torch.Tensor:
        """The last block's output (B, T, H), before the final norm. Training calls it with
        `segments` (B, T) to keep samples packed into one row from seeing each other (no cache)."""
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        x = self.model.embed_tokens(tokens)
        if cache is not None:
            kv_len = int(positions.max()) + 1 if kv_len is None else kv_len
            key_positions = torch.arange(kv_len, device=tokens.device)[None]
            where = cache.locate(slots, positions, kv_len)
        else:
            kv_len, key_positions, where = T, positions, None
        inv_freq = self.inv_freq
        if self.dynamic_ntk:  # NTK base grows with the sequence; cached keys keep their rotation
            inv_freq = dynamic_inv_freq(self.config, int(positions.max()) + 1).to(x.device)
        cos, sin = rotary_cos_sin(positions, inv_freq, self.attention_scaling, x.dtype)
        fused = next((step for step in (self.decode_step, self.prefill_step)
                      if step is not None and step.applies(x, cache)), None)
        windows = {self.config.layer_window(i) for i in range(self.config.num_hidden_layers)}
        masks = {} if self.dca or (fused is not None and fused is self.decode_step) else {
            w: attention_mask(positions, key_positions, w, segments) for w in windows}
        if None in masks and T > 1 and kv_len == T and segments is None and torch.equal(
                positions, torch.arange(T, device=positions.device).expand(B, T)):
            masks[None] = None  # every row starts at 0 and sees exactly its past: SDPA's own causal rule
        ctx = Context(positions, key_positions, cos, sin, inv_freq, self.attention_scaling, masks, cache, where,
                      kv_len, self.dca, router_logits)
        if fused is not None:  # the decode call needs no masks: it reads each row's keys up to its own position
            return fused(x, ctx)
        for block in self.model.layers:
            x = block(x, ctx)
        return x

    @classmethod
    def from_state_dict(cls, config: Qwen2Config, state_dict: dict[str, torch.Tensor],
                        dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> Transformer:
        """Build on the meta device and adopt the given tensors (no copy when dtype matches)."""
        with torch.device("meta"):
            model = cls(config)
        return model.adopt(state_dict, dtype, device)

    def adopt(self, state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None = None,
              device: torch.device | str = "cpu") -> Transformer:
        """Take the given tensors as the parameters of this model built on the meta device (and
        perhaps reshaped from outside since): every name and shape must match."""
        model, config = self, self.config
        expected = set(model.state_dict())
        if config.tie_word_embeddings:
            expected.discard("lm_head.weight")
            state_dict = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
        missing, unexpected = expected - set(state_dict), set(state_dict) - expected
        if missing or unexpected:
            raise WeightsError(
                f"checkpoint does not match the config: missing {sorted(missing)[:5]}"
                f"{'...' if len(missing) > 5 else ''}, unexpected {sorted(unexpected)[:5]}"
                f"{'...' if len(unexpected) > 5 else ''}"
            )
        shapes = model.state_dict()
        wrong = [f"{k} is {tuple(v.shape)}, the config implies {tuple(shapes[k].shape)}"
                 for k, v in state_dict.items() if v.shape != shapes[k].shape]
        if wrong:
            raise WeightsError(f"checkpoint does not match its config: {'; '.join(wrong[:3])}"
                               f"{f' (and {len(wrong) - 3} more)' if len(wrong) > 3 else ''}; the config "
                               "belongs to another model size, or the file is corrupt")
        state_dict = {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in state_dict.items()}
        model.load_state_dict(state_dict, assign=True, strict=False)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.set_rope(config)
        return model.eval()
