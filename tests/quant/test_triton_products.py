"""How our Triton products are launched (qwen2.quant.triton_products): the block sizes a kernel runs
at, tuned on CUDA or fixed elsewhere, and the dtype its tiles are multiplied in. The products
themselves are tested with their kernels (test_triton_int4.py, test_triton_int8.py,
test_triton_blocks.py)."""
import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is a dev dependency (pip install -e '.[dev]'); no wheel here")

from qwen2.quant import triton_int8  # noqa: E402
from qwen2.quant.triton_products import Kernel, tile_dtype  # noqa: E402


def test_without_tuning_a_kernel_runs_at_the_given_blocks_or_its_fixed_ones():
    kernel = Kernel(triton_int8._int8_gemv, [triton.Config(dict(BLOCK_N=8, BLOCK_K=512))], ["N", "K"],
                    dict(BLOCK_N=16, BLOCK_K=128))
    fn, meta = kernel.pick(False, None)
    assert fn is triton_int8._int8_gemv and meta == dict(BLOCK_N=16, BLOCK_K=128)
    meta["BLOCK_N"] = 2  # the caller's copy: the fixed sizes stay
    assert kernel.pick(False, dict(BLOCK_N=4, BLOCK_K=64))[1] == dict(BLOCK_N=4, BLOCK_K=64)
    assert kernel.pick(False, None)[1] == dict(BLOCK_N=16, BLOCK_K=128) and kernel.tuner is None


def test_tuning_builds_one_tuner_over_the_configurations_keyed_by_the_shape():
    kernel = Kernel(triton_int8._int8_gemv, [triton.Config(dict(BLOCK_N=n, BLOCK_K=512)) for n in (8, 16)],
                    ["N", "K"], dict(BLOCK_N=16, BLOCK_K=128))
    tuner, meta = kernel.pick(True, None)
    assert meta == {} and isinstance(tuner, triton.runtime.Autotuner) and kernel.pick(True, None)[0] is tuner
    assert [c.kwargs["BLOCK_N"] for c in tuner.configs] == [8, 16] and tuner.keys == ["N", "K"]
    assert kernel.chosen() == {}  # nothing launched yet


def test_heuristics_apply_whether_tuned_or_not():
    kernel = Kernel(triton_int8._int8_gemv, [triton.Config(dict(BLOCK_N=8, BLOCK_K=512))], ["N", "K"],
                    dict(BLOCK_N=16, BLOCK_K=128), {"EVEN": lambda meta: True})
    assert isinstance(kernel.pick(False, None)[0], triton.runtime.Heuristics)
    assert isinstance(kernel.pick(True, None)[0].fn, triton.runtime.Heuristics)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tiles_are_multiplied_in_float32_off_the_gpu(dtype):
    assert tile_dtype(torch.zeros(1, dtype=dtype)) == triton.language.float32  # the interpreter's casts differ
