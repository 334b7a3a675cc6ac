"""A decode step's layers on CUDA with Triton kernels where torch runs strings of small ones.

In a CUDA graph every kernel still costs 1.5-2.5 us of launch and ramp; on the Qwen2-7B config the
small ones were ~1.6 ms of a 6.05 ms batch-1 step and attention 0.67 ms (bench/RESULTS.md, CUDA).
`TritonDecode`, attached as `model.decode_step`, runs a one-token-per-row forward over the paged
cache with the model's own matrix products and, around them, per layer:

1. `_rotate_and_write` (for rotary on q and k: neg, cat, two muls and an add each; the cache's
   write: a copy and an index_copy_ each for k and v): one program a (row, head) rotates q into a
   buffer and k, v straight into their slot of the paged pools.
2. `_attend_split` (for the cache's read, an index_select of every block a row holds, the mask and
   SDPA): one program a (row, KV head, span of keys) reads the span's blocks where they lie through
   the block table and keeps a running maximum, sum and weighted sum of values for the KV head's
   query heads (flash-decoding: one row of a few KV heads still fills the GPU);
   `_merge_splits`: one program a (row, KV head) rescales and adds the spans' results.
3. `_add_rms_norm` (for the residual add and RMSNorm's cast, norm, cast back and weight): twice.
4. `_silu_mul` (for SiLU and the product with up).

About 30 launches a layer become about 10 (the matrix products among them); int4 and GGUF block
layers on our Triton kernels (qwen2.quant.triton_int4, triton_blocks) are stacked into one q/k/v
and one gate/up product each, as Transformer.fuse_weights stacks float ones. The arithmetic is the
model's: the same roundings to the model's dtype at the same places, float32 inside. All shapes
follow the step's fixed (batch, keys) bucket, so the kernels capture in a CUDA graph. Covered:
causal masking by each row's position, sliding windows, GQA, MoE layers (their own forward),
padding rows (slot -1: block 0, whose output nobody reads); not dual chunk attention. Without CUDA
the kernels run in Triton's interpreter when TRITON_INTERPRET=1 is set before Triton loads
(tests/conftest.py does), in float32 products.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

from qwen2.model import Context, MoE, PagedKVCache, RMSNorm, Transformer

SPAN = 64  # keys a program attends to: 576 keys of one row are 9 programs per KV head


@triton.jit
def _rotate_and_write(q_in, q_stride, k_in, k_stride, v_in, v_stride, cos_ptr, sin_ptr, q_out, k_pool, v_pool,
                      flat_ptr, N_HEADS: tl.constexpr, N_KV: tl.constexpr, HEAD_DIM: tl.constexpr):
    row, head = tl.program_id(0), tl.program_id(1)
    half = tl.arange(0, HEAD_DIM // 2)
    if head < N_HEADS:
        src = q_in + row * q_stride + head * HEAD_DIM
    elif head < N_HEADS + N_KV:
        src = k_in + row * k_stride + (head - N_HEADS) * HEAD_DIM
    else:
        src = v_in + row * v_stride + (head - N_HEADS - N_KV) * HEAD_DIM
    x1 = tl.load(src + half).to(tl.float32)
    x2 = tl.load(src + HEAD_DIM // 2 + half).to(tl.float32)
    if head < N_HEADS + N_KV:  # q and k turn by their position's angle; v is copied as it is
        cos = tl.load(cos_ptr + row * HEAD_DIM + half).to(tl.float32)  # cos/sin repeat over the halves
        sin = tl.load(sin_ptr + row * HEAD_DIM + half).to(tl.float32)
        x1, x2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    slot = tl.load(flat_ptr + row)
    if head < N_HEADS:
        dst = q_out + (row * N_HEADS + head) * HEAD_DIM
    elif head < N_HEADS + N_KV:
        dst = k_pool + (slot * N_KV + head - N_HEADS) * HEAD_DIM
    else:
        dst = v_pool + (slot * N_KV + head - N_HEADS - N_KV) * HEAD_DIM
    tl.store(dst + half, x1.to(dst.dtype.element_ty))
    tl.store(dst + HEAD_DIM // 2 + half, x2.to(dst.dtype.element_ty))


@triton.jit
def _attend_split(q_ptr, k_pool, v_pool, tables_ptr, positions_ptr, m_ptr, l_ptr, acc_ptr, scale, window,
                  table_stride, SPLITS, N_HEADS: tl.constexpr, N_KV: tl.constexpr, HEAD_DIM: tl.constexpr,
                  GROUP: tl.constexpr, BLOCK: tl.constexpr, SPAN: tl.constexpr, DOT: tl.constexpr):
    row, kv, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    heads = tl.arange(0, GROUP)  # the KV head's query heads, padded to a power of two (>= 16 for tl.dot)
    head_ok = heads < N_HEADS // N_KV
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + (row * N_HEADS + kv * (N_HEADS // N_KV) + heads)[:, None] * HEAD_DIM + dims[None, :],
                mask=head_ok[:, None], other=0.0)
    position = tl.load(positions_ptr + row)
    first = tl.where(window > 0, tl.maximum(position - window + 1, 0), 0)
    m = tl.full([GROUP], float("-inf"), tl.float32)
    total = tl.zeros([GROUP], tl.float32)
    acc = tl.zeros([GROUP, HEAD_DIM], tl.float32)
    offsets = tl.arange(0, BLOCK)
    for start in range(split * SPAN, split * SPAN + SPAN, BLOCK):
        keys = start + offsets
        seen = (keys <= position) & (keys >= first)
        if start <= position:  # spans past the row's end read nothing
            block = tl.load(tables_ptr + row * table_stride + start // BLOCK)
            at = ((block * BLOCK + offsets) * N_KV + kv)[:, None] * HEAD_DIM + dims[None, :]
            k = tl.load(k_pool + at)
            v = tl.load(v_pool + at)
            scores = tl.dot(q.to(DOT), tl.trans(k.to(DOT)), input_precision="ieee") * scale  # (GROUP, BLOCK)
            scores = tl.where(seen[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            # a span whose keys are all masked keeps m at -inf: no exp(-inf - -inf)
            safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(scores - safe[:, None])
            rescale = tl.exp(m - safe)
            total = total * rescale + tl.sum(p, axis=1)
            acc = acc * rescale[:, None] + tl.dot(p.to(DOT), v.to(DOT), input_precision="ieee")
            m = m_new
    out = (row * N_KV + kv) * SPLITS + split
    tl.store(m_ptr + out * GROUP + heads, m)
    tl.store(l_ptr + out * GROUP + heads, total)
    tl.store(acc_ptr + (out * GROUP + heads)[:, None] * HEAD_DIM + dims[None, :], acc)


@triton.jit
def _merge_splits(m_ptr, l_ptr, acc_ptr, out_ptr, SPLITS, N_HEADS: tl.constexpr, N_KV: tl.constexpr,
                  HEAD_DIM: tl.constexpr, GROUP: tl.constexpr):
    row, kv = tl.program_id(0), tl.program_id(1)
    heads = tl.arange(0, GROUP)
    dims = tl.arange(0, HEAD_DIM)
    base = (row * N_KV + kv) * SPLITS
    best = tl.full([GROUP], float("-inf"), tl.float32)
    for split in range(0, SPLITS):
        best = tl.maximum(best, tl.load(m_ptr + (base + split) * GROUP + heads))
    total = tl.zeros([GROUP], tl.float32)
    acc = tl.zeros([GROUP, HEAD_DIM], tl.float32)
    for split in range(0, SPLITS):
        m = tl.load(m_ptr + (base + split) * GROUP + heads)
        weight = tl.where(m == float("-inf"), 0.0, tl.exp(m - best))  # a span with no key weighs nothing
        total += tl.load(l_ptr + (base + split) * GROUP + heads) * weight
        acc += tl.load(acc_ptr + ((base + split) * GROUP + heads)[:, None] * HEAD_DIM + dims[None, :]) * weight[:, None]
    head_ok = heads < N_HEADS // N_KV
    y = acc / tl.where(head_ok, total, 1.0)[:, None]
    dst = out_ptr + (row * N_HEADS + kv * (N_HEADS // N_KV) + heads)[:, None] * HEAD_DIM + dims[None, :]
    tl.store(dst, y.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])


@triton.jit
def _add_rms_norm(x_ptr, r_ptr, w_ptr, x_out, h_out, H, eps, BLOCK: tl.constexpr):
    # x + r rounded to the model's dtype (the residual stream), then RMSNorm as RMSNorm.forward does
    # it: normalised in float32, cast back, then times the weight
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < H
    x = tl.load(x_ptr + row * H + cols, mask=ok, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + row * H + cols, mask=ok, other=0.0).to(tl.float32)
    total = (x + r).to(x_out.dtype.element_ty)
    tl.store(x_out + row * H + cols, total, mask=ok)
    t = total.to(tl.float32)
    normed = (t * tl.rsqrt(tl.sum(t * t, axis=0) / H + eps)).to(h_out.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0)
    tl.store(h_out + row * H + cols, (w.to(tl.float32) * normed.to(tl.float32)).to(h_out.dtype.element_ty), mask=ok)


@triton.jit
def _silu_mul(gate_up, out, WIDTH, BLOCK: tl.constexpr):
    # silu(gate) rounded to the model's dtype, times up: F.silu(gate) * up, as MLP.forward does it
    row, part = tl.program_id(0), tl.program_id(1)
    cols = part * BLOCK + tl.arange(0, BLOCK)
    ok = cols < WIDTH
    gate = tl.load(gate_up + row * 2 * WIDTH + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(gate_up + row * 2 * WIDTH + WIDTH + cols, mask=ok, other=0.0).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(out.dtype.element_ty).to(tl.float32)
    tl.store(out + row * WIDTH + cols, (silu * up).to(out.dtype.element_ty), mask=ok)


def add_rms_norm(x: torch.Tensor, r: torch.Tensor, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + r, norm(x + r)) in one kernel, x and r (..., H) in the model's dtype."""
    H = x.shape[-1]
    x_out, h_out = torch.empty_like(x), torch.empty_like(x)
    rows = x.numel() // H
    _add_rms_norm[(rows,)](x.contiguous(), r.contiguous(), norm.weight, x_out, h_out, H, norm.eps,
                           BLOCK=triton.next_power_of_2(H))
    return x_out, h_out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """F.silu(gate) * up for gate_up (..., 2 * I) holding gate then up, in one kernel."""
    width = gate_up.shape[-1] // 2
    out = gate_up.new_empty(*gate_up.shape[:-1], width)
    rows = gate_up.numel() // (2 * width)
    _silu_mul[(rows, triton.cdiv(width, 1024))](gate_up.contiguous(), out, width, BLOCK=1024)
    return out


class DecodeAttention:
    """The attention of a one-token-per-row forward over a paged cache (Context.decode_attention):
    rotary, the cache write and attention, from the projected q/k/v to the input of o_proj."""

    def __init__(self, model: Transformer):
        config = model.config
        if model.dca is not None:
            raise ValueError("the Triton decode attention does not cover dual chunk attention")
        if config.head_dim & (config.head_dim - 1) or config.head_dim < 16:
            raise ValueError(f"the Triton decode attention needs a power-of-two head_dim >= 16, not {config.head_dim}")
        self.n_heads, self.n_kv, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                  config.head_dim)
        self.group = max(16, triton.next_power_of_2(self.n_heads // self.n_kv))
        self.windows = [config.layer_window(i) or 0 for i in range(config.num_hidden_layers)]

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: Context) -> torch.Tensor:
        """q (B, 1, nh * hd), k and v (B, 1, n_kv * hd), projected -> attention's output (B, 1, nh * hd)."""
        B = q.shape[0]
        nh, n_kv, hd = self.n_heads, self.n_kv, self.head_dim
        # views of the stacked q/k/v product, or three products: a row stride each, the heads contiguous
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        cache, (flat, tables) = ctx.cache, ctx.where
        k_pool, v_pool = cache.k[layer], cache.v[layer]
        cos, sin = ctx.cos.contiguous(), ctx.sin.contiguous()
        rotated = torch.empty(B, nh, hd, dtype=q.dtype, device=q.device)
        _rotate_and_write[(B, nh + 2 * n_kv)](q, q.stride(0), k, k.stride(0), v, v.stride(0), cos, sin, rotated,
                                              k_pool, v_pool, flat, N_HEADS=nh, N_KV=n_kv, HEAD_DIM=hd)
        splits = -(-ctx.kv_len // SPAN)
        partial = torch.empty(2, B, n_kv, splits, self.group, dtype=torch.float32, device=q.device)
        acc = torch.empty(B, n_kv, splits, self.group, hd, dtype=torch.float32, device=q.device)
        # the tensor cores' dtype on the GPU; float32 in the interpreter (its bf16 products are wrong)
        dot = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}.get(q.dtype, tl.float32) if q.is_cuda \
            else tl.float32
        _attend_split[(B, n_kv, splits)](
            rotated, k_pool, v_pool, tables, ctx.positions, partial[0], partial[1], acc, hd ** -0.5,
            self.windows[layer], tables.stride(0), splits, N_HEADS=nh, N_KV=n_kv, HEAD_DIM=hd, GROUP=self.group,
            BLOCK=cache.block_size, SPAN=SPAN, DOT=dot)
        out = torch.empty(B, 1, nh * hd, dtype=q.dtype, device=q.device)
        _merge_splits[(B, n_kv)](partial[0], partial[1], acc, out, splits, N_HEADS=nh, N_KV=n_kv, HEAD_DIM=hd,
                                 GROUP=self.group)
        return out


def _stack(linears: list[nn.Module]) -> nn.Module | None:
    """One layer computing `linears`' outputs side by side, where their class can stack them
    (TritonInt4Linear.stack, TritonBlockLinear.stack in qwen2.quant), else None."""
    kind = type(linears[0])
    if not hasattr(kind, "stack") or any(type(m) is not kind for m in linears):
        return None
    return kind.stack(linears)


class TritonDecode:
    """Runs the layers of a one-token-per-row forward over a paged cache (`applies` says when), for
    `Transformer.decode_step`: the model's modules for the matrix products and MoE layers, these
    kernels between them."""

    def __init__(self, model: Transformer):
        self.model = model
        self.attention = DecodeAttention(model)
        # int4 and block layers on our Triton kernels stacked as the float ones are (Transformer.fuse_weights):
        # q/k/v and gate/up one product each; None where a layer's are float or do not stack
        self.qkv, self.gate_up = [], []
        for block in model.model.layers:
            attn, mlp = block.self_attn, block.mlp
            self.qkv.append(_stack([attn.q_proj, attn.k_proj, attn.v_proj]))
            self.gate_up.append(None if isinstance(mlp, MoE) else _stack([mlp.gate_proj, mlp.up_proj]))

    def applies(self, x: torch.Tensor, cache: object) -> bool:
        """Whether a forward of `x` (B, T, H) over `cache` is a decode step this computes."""
        return (x.shape[1] == 1 and isinstance(cache, PagedKVCache) and cache.block_size >= 16
                and SPAN % cache.block_size == 0 and not (torch.is_grad_enabled() and x.requires_grad))

    def __call__(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        ctx = replace(ctx, decode_attention=self.attention)
        layers = self.model.model.layers
        h = layers[0].input_layernorm(x)
        for i, block in enumerate(layers):
            attn, mlp = block.self_attn, block.mlp
            if self.qkv[i] is not None:
                q, k, v = self.qkv[i](h).split([attn.q_proj.out_features, attn.k_proj.out_features,
                                                attn.v_proj.out_features], dim=-1)
                attended = attn.o_proj(attn.attend(q, k, v, ctx))
            else:
                attended = attn(h, ctx)
            x, h = add_rms_norm(x, attended, block.post_attention_layernorm)
            if isinstance(mlp, MoE):
                out = mlp(h, ctx)
            elif self.gate_up[i] is not None:
                out = mlp.down_proj(silu_mul(self.gate_up[i](h)))
            elif mlp.fused:  # the stacked float gate/up product (Transformer.fuse_weights)
                out = mlp.down_proj(silu_mul(F.linear(h, mlp.gate_up)))
            else:
                out = mlp(h)
            if i + 1 < len(layers):  # the residual add meets the next layer's first norm
                x, h = add_rms_norm(x, out, layers[i + 1].input_layernorm)
            else:
                x = x + out
        return x
