"""One table of quantization modes: what auto becomes for each device, checkpoint and process
count, what an explicit mode is refused for, and every command listing the same modes."""

import importlib.util
import json

import pytest

from qwen2 import quant
from qwen2.cli import build_parser
from qwen2.errors import OptionError
from qwen2.loading import load
from qwen2.quant import CHOICES, MODES, resolve_quant


@pytest.fixture
def gptq_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq", "bits": 4}}))
    return tmp_path


def test_auto_runs_each_checkpoint_on_its_fastest_exact_path(tiny_gguf, tiny_hf, gptq_folder):
    assert resolve_quant("auto", "cpu", tiny_gguf) == "gguf"  # the file's own blocks
    assert resolve_quant("auto", "cpu", tiny_hf) == "q8_0"
    assert resolve_quant("auto", "cpu", gptq_folder) == "gptq"  # its own int4, on any device
    assert resolve_quant("auto", "cuda", gptq_folder) == "gptq"
    assert resolve_quant("int4", "cpu", gptq_folder) == "gptq"
    # on CUDA a GGUF runs its own blocks through our Triton kernels (where Triton is installed), an HF checkpoint float
    assert resolve_quant("auto", "cuda", tiny_gguf) == ("gguf" if importlib.util.find_spec("triton") else "none")
    assert resolve_quant("auto", "cuda", tiny_hf) == "none"


def test_under_tensor_parallelism_auto_is_float_and_only_shardable_modes_run(tiny_gguf, tiny_hf):
    assert resolve_quant("auto", "cpu", tiny_gguf, world_size=2) == "none"
    assert resolve_quant("int8", "cpu", tiny_hf, world_size=2) == "int8"
    with pytest.raises(OptionError, match="not available under tensor parallelism.*none, int8, int4"):
        resolve_quant("q8_0", "cpu", tiny_hf, world_size=2)


@pytest.mark.parametrize("mode, device, words", [
    ("gguf", "cpu", "not a GGUF"), ("q4_k", "cuda", "runs on cpu, not cuda"), ("gptq", "cpu", "is not one"),
    ("gguf-f32", "cuda", r"runs on cpu, not cuda; use gguf \(our Triton kernels\) or none"),
    ("fp8", "cpu", "unknown quant 'fp8'; choose one of auto, none"),
])  # fmt: skip
def test_an_explicit_mode_is_refused_with_what_to_use(tiny_hf, mode, device, words):
    with pytest.raises(OptionError, match=words):
        resolve_quant(mode, device, tiny_hf)


def test_the_loaded_llm_records_the_mode_it_runs(tiny_gguf, tiny_hf):
    assert load(tiny_gguf, ctx=64, max_concurrency=1).quant == "gguf"
    assert load(tiny_hf, ctx=64, max_concurrency=1, quant="int8").quant == "int8"


def _quant_choices(argv: list[str]) -> tuple[str, ...]:
    parser = build_parser()
    for word in argv:  # walk down to the subcommand's parser
        parser = next(a for a in parser._actions if a.dest.endswith("command")).choices[word]
    return tuple(next(a for a in parser._actions if a.dest == "quant").choices or ())


@pytest.mark.parametrize("argv", [["generate"], ["chat"], ["serve"], ["eval", "humaneval"], ["eval", "ppl"],
                                  ["docqa"], ["data", "exec-feedback"]])
def test_every_command_lists_the_tables_modes(argv):
    assert _quant_choices(argv) == CHOICES


def test_the_planner_sizes_every_mode_of_the_table(capsys):
    from qwen2.cli import main
    from qwen2.config import Qwen2Config
    from qwen2.planner import weight_bytes

    config = Qwen2Config.from_preset("Qwen2-0.5B")
    of_files = [mode for mode in MODES if quant.file_blocks(mode)]  # sized by the block types a file holds
    assert of_files == ["gguf", "gguf-f32"]
    for mode in MODES:
        if mode not in of_files:
            main(["info", "--preset", "Qwen2-0.5B", "--plan", "--quant", mode])
    assert weight_bytes(config, 1, "int4") < weight_bytes(config, 1, "int8") < weight_bytes(config, 1, "none")
    assert capsys.readouterr().out.count("# Qwen2-0.5B") == len(MODES) - len(of_files)
    for mode in of_files:
        with pytest.raises(SystemExit):
            main(["info", "--preset", "Qwen2-0.5B", "--plan", "--quant", mode])
        assert "plan it by its type, one of " + ", ".join(quant.FILE_BLOCK_TYPES) in capsys.readouterr().err

