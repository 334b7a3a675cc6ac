"""How our Triton weight-only products are launched: int4 (triton_int4.py), int8 (triton_int8.py)
and GGUF blocks (triton_blocks.py) each have two kernels over activations x (M, K) and their
weights, which take their arguments in one order, (x, *weights, y, [M,] N, K, *extra, [M_BUCKET,]
constants): a GEMV for one activation row (a batch-1 decode step, as fast as it streams the
weights' bytes), and a kernel of tiles on the tensor cores for more rows.

On CUDA the block sizes are tuned per shape at first use (triton.autotune, among each kernel's
configurations); elsewhere (the tests, in Triton's interpreter) they are fixed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


class Kernel:
    """A Triton kernel and the block sizes it may run at: `configs` for the tuner, keyed by `key`
    (argument names), and `fixed` where nothing is tuned. `heuristics`: constexprs computed from
    the arguments at each launch (triton.heuristics), tuned or not."""

    def __init__(self, fn: triton.JITFunction, configs: list[triton.Config], key: list[str], fixed: dict[str, int],
                 heuristics: dict | None = None):
        self.fn = triton.heuristics(heuristics)(fn) if heuristics else fn
        self.configs, self.key, self.fixed = configs, key, fixed
        self.tuner: triton.runtime.Autotuner | None = None

    def pick(self, tune: bool, config: dict[str, int] | None) -> tuple:
        """(the kernel to launch, the block sizes to pass it): the tuner's, or `config` or `fixed`."""
        if not tune:
            return self.fn, dict(config or self.fixed)
        if self.tuner is None:
            self.tuner = triton.autotune(self.configs, key=self.key)(self.fn)
        return self.tuner, {}

    def chosen(self) -> dict[str, str]:
        """The tuner's choice for each key it has met (none before the first tuned launch)."""
        return {str(key): str(config) for key, config in (self.tuner.cache.items() if self.tuner else ())}


def tile_dtype(x: Tensor) -> tl.dtype:
    """The dtype tiles are multiplied in: x's own on the GPU's tensor cores; float32 in Triton's
    interpreter, whose bf16 and fp16 conversions and products are not the GPU's."""
    if not x.is_cuda:
        return tl.float32
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}.get(x.dtype, tl.float32)


def product(x: Tensor, weights: tuple[Tensor, ...], n: int, extra: tuple, gemv: Kernel, tiles: Kernel,
            config: dict[str, int] | None = None, **constants) -> Tensor:
    """x (M, K) times the weights -> (M, n) in x's dtype: `gemv` for one row, `tiles` for more.
    `config` fixes the block sizes (tests); on CUDA they are otherwise tuned per shape."""
    m, k = x.shape
    x = x.contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    tune = config is None and x.is_cuda
    if m == 1:
        kernel, meta = gemv.pick(tune, config)
        kernel[lambda c: (triton.cdiv(n, c["BLOCK_N"]),)](x, *weights, y, n, k, *extra, **constants, **meta)
    elif m > 1:
        kernel, meta = tiles.pick(tune, config)
        bucket = min(triton.next_power_of_2(m), 256)  # the tuner's key for the rows: their order of magnitude
        kernel[lambda c: (triton.cdiv(m, c["BLOCK_M"]), triton.cdiv(n, c["BLOCK_N"]))](
            x, *weights, y, m, n, k, *extra, bucket, **constants, DOT=tile_dtype(x), **meta)
    return y
