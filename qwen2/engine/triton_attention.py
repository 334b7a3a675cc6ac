"""A decode step's attention on CUDA in three Triton kernels instead of ~20 small torch ops a layer.

Run eagerly, a decode step's attention is rotary (neg, cat, two muls and an add for q and again for
k), the paged cache's write (a copy and an index_copy_ each for k and v), its read (an
index_select of every block a row holds, per layer), a mask and SDPA. In a CUDA graph each of those
is still a kernel of 1.5-2.5 us; on the Qwen2-7B config they were ~1.6 ms of a 6.05 ms step
(bench/RESULTS.md, CUDA). Here:

1. `_rotate_and_write`: one program a (row, head) rotates q into a buffer, and rotates k and copies v
   straight into their slot of the paged pools.
2. `_attend_split`: one program a (row, KV head, span of keys) reads that span's blocks through the
   block table where they lie (nothing gathered), and keeps a running maximum, sum and weighted sum
   of values for the KV head's group of query heads (flash-decoding: a row's keys split over many
   programs, so one row of a few KV heads still fills the GPU).
3. `_merge_splits`: one program a (row, KV head) rescales and adds the spans' partial results.

All shapes follow the step's fixed (batch, keys) bucket, so the three capture in a CUDA graph. It
covers what the model's own path does for a paged cache: causal masking by each row's position, a
sliding window, GQA, padding rows (slot -1: block 0, whose output nobody reads); not dual chunk
attention (the loader does not attach it then). Without CUDA it runs in Triton's interpreter when
TRITON_INTERPRET=1 is set before Triton loads (tests/conftest.py does), in float32 products.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwen2.model import Context, PagedKVCache, Transformer

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


class DecodeAttention:
    """The attention of a one-token-per-row forward over a paged cache, for `Transformer.decode_attention`
    (`applies` says when): rotary, the cache write and attention, from the projected q/k/v to the
    input of o_proj."""

    def __init__(self, model: Transformer):
        config = model.config
        if model.dca is not None:
            raise ValueError("the Triton decode attention does not cover dual chunk attention")
        if config.head_dim & (config.head_dim - 1) or config.head_dim < 16:
            raise ValueError(f"the Triton decode attention needs a power-of-two head_dim >= 16, not {config.head_dim}")
        self.model = model
        self.n_heads, self.n_kv, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                  config.head_dim)
        self.group = max(16, triton.next_power_of_2(self.n_heads // self.n_kv))
        self.windows = [config.layer_window(i) or 0 for i in range(config.num_hidden_layers)]

    def applies(self, x: torch.Tensor, cache: object) -> bool:
        """Whether a forward of `x` (B, T, H) over `cache` is a decode step this computes."""
        return (x.shape[1] == 1 and isinstance(cache, PagedKVCache) and cache.block_size >= 16
                and SPAN % cache.block_size == 0 and not (torch.is_grad_enabled() and x.requires_grad))

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
