"""The memory planner: its bytes equal what our modules and caches allocate, its limits are the
edges of what fits, and `qwen2 info --plan` covers every preset."""

import pytest
import torch

from qwen2.cli import main
from qwen2.config import PRESETS, Qwen2Config
from qwen2.errors import OptionError
from qwen2.model import KVCache, PagedKVCache, Transformer
from qwen2.options import parse_bytes
from qwen2.planner import kv_bytes_per_token, plan, weight_bytes
from qwen2.quant.int_linear import quantize_model

SMALL = Qwen2Config.from_preset("Qwen2-0.5B")


def module_bytes(model: torch.nn.Module) -> int:
    tensors = {id(t): t for t in model.state_dict(keep_vars=True).values() if t is not None}
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.mark.parametrize("quant", ["none", "int8", "int4"])
def test_weight_bytes_of_the_0_5b_equal_what_our_modules_hold(quant):
    with torch.device("meta"):  # the module tree loading builds, without the memory
        model = Transformer(SMALL).to(torch.bfloat16)
        quantize_model(model, quant, 128, empty=True)
    assert weight_bytes(SMALL, 1, quant, "bfloat16") == module_bytes(model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kv_bytes_per_token_equal_the_caches(dtype):
    name = str(dtype).removeprefix("torch.")
    assert kv_bytes_per_token(SMALL, 1, name) == KVCache(SMALL, 1, 16, dtype, "meta").bytes_per_token()
    assert kv_bytes_per_token(SMALL, 1, name) == PagedKVCache(SMALL, 2, 16, 1, 16, dtype, "meta").bytes_per_token()


def test_the_largest_context_and_batch_are_the_edges_of_what_fits():
    config = Qwen2Config.from_preset("Qwen2-7B")
    p = plan(config, 1, parse_bytes("24GB"), "int8", ctx=4096, batch=2)
    assert p.fits and 4096 < p.max_ctx < config.context_limit
    assert plan(config, 1, parse_bytes("24GB"), "int8", ctx=p.max_ctx, batch=2).fits
    assert not plan(config, 1, parse_bytes("24GB"), "int8", ctx=p.max_ctx + 1, batch=2).fits
    assert plan(config, 1, parse_bytes("24GB"), "int8", ctx=4096, batch=p.max_batch).fits
    assert not plan(config, 1, parse_bytes("24GB"), "int8", ctx=4096, batch=p.max_batch + 1).fits


def test_sharding_divides_the_weights_and_the_kv_cache():
    big = Qwen2Config.from_preset("Qwen2-72B")
    one, eight = plan(big, 1, parse_bytes("80GB")), plan(big, 8, parse_bytes("80GB"))
    assert not one.fits and eight.fits
    assert eight.kv_per_token * 8 == one.kv_per_token
    assert one.weights / 8 < eight.weights < one.weights / 7.9  # norms are replicated


def test_info_plan_prints_every_preset_and_the_splits_that_cannot_be(capsys):
    main(["info", "--preset", "all", "--plan", "--devices", "1,2,4,8", "--quant", "int4"])
    out = capsys.readouterr().out
    for name in PRESETS:
        assert f"# {name}: weights int4" in out
    assert "8  not possible: 4 KV heads do not split over 8 devices" in out  # 57B-A14B, 7B


def test_bad_plan_options_are_one_clear_line(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["info", "--preset", "Qwen2-7B", "--plan", "--device-memory", "lots"])
    assert exit.value.code == 2
    assert "argument --device-memory: not a memory size: 'lots'" in capsys.readouterr().err
    with pytest.raises(OptionError, match="unknown --quant"):
        plan(SMALL, 1, parse_bytes("8GB"), "int3")
