"""The composition root: one meaning for every model spec and option, checked before any work,
and the layering it exists for (the engine builds nothing; model.py knows no files)."""

import ast
import inspect
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import qwen2
from qwen2.device import resolve_device
from qwen2.errors import OptionError, WeightsError
from qwen2.loading import check_kernels, load, load_model
from qwen2.options import DEFAULT_CTX, DEFAULTS
from qwen2.weights import locate

PACKAGE = Path(qwen2.__file__).parent


def imported_modules(path: Path) -> set[str]:
    """Every qwen2 module a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {m for m in found if m.startswith("qwen2")}


def imports_of(folder_or_file: str) -> dict[str, set[str]]:
    target = PACKAGE / folder_or_file
    files = sorted(target.rglob("*.py")) if target.is_dir() else [target]
    return {str(f.relative_to(PACKAGE)): imported_modules(f) for f in files}


def offending(folder_or_file: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{file} imports {m}" for file, modules in imports_of(folder_or_file).items() for m in sorted(modules)
            if any(m == f or m.startswith(f + ".") for f in forbidden)]


def test_the_engine_receives_a_built_model():
    assert offending("engine", ("qwen2.weights", "qwen2.quant", "qwen2.loading", "qwen2.options")) == []


def test_model_py_imports_nothing_above_it():
    allowed = {"qwen2.config", "qwen2.rope", "qwen2.dca", "qwen2.errors"}
    assert {m.rsplit(".", 1)[0] if m not in allowed else m for m in imported_modules(PACKAGE / "model.py")} <= allowed


def test_weights_read_files_and_build_no_network():
    assert offending("weights", ("qwen2.model", "qwen2.quant", "qwen2.engine", "qwen2.loading")) == []


def test_parallelism_is_applied_to_a_model_the_root_builds():  # loading calls distributed, not the reverse
    assert offending("distributed", ("qwen2.loading",)) == []


def test_no_module_imports_a_private_name_of_another():
    private = []
    for file in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(file.read_text())
        modules = set()  # names bound to qwen2 modules: `from qwen2.train import synth_cli`, `import qwen2.x as y`
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qwen2"):
                private += [f"{file.relative_to(PACKAGE)}: {a.name}" for a in node.names if a.name.startswith("_")]
                modules |= {a.asname or a.name for a in node.names}
            if isinstance(node, ast.Import):
                modules |= {a.asname for a in node.names if a.name.startswith("qwen2") and a.asname}
        for node in ast.walk(tree):  # module._name reaches in just the same
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                private.append(f"{file.relative_to(PACKAGE)}: {node.value.id}.{node.attr}")
    assert private == []


def test_the_agent_is_beneath_the_server():  # the server mounts the agent's routes, never the reverse
    assert offending("agent", ("qwen2.server",)) == []


def test_front_doors_load_through_the_root():
    for door in ("cli.py", "server", "eval", "bench"):
        assert offending(door, ("qwen2.engine.llm.load", "qwen2.weights.quantized")) == [], door


def test_load_shows_its_real_signature_with_the_cli_defaults():
    assert qwen2.load is load
    params = inspect.signature(qwen2.load).parameters
    assert {k: params[k].default for k in asdict(DEFAULTS)} == asdict(DEFAULTS)
    assert params["quant"].default == "auto"  # the same default as every command


@pytest.mark.parametrize("spec, kind", [
    (None, "packed"), ("", "packed"), ("qwen2.5-coder-0.5b-instruct", "packed"),
    ("Qwen2.5-Coder-1.5B-Instruct", "packed"), ("Qwen/Qwen2-0.5B-Instruct", "hub"), ("org/model.v2", "hub"),
])  # fmt: skip
def test_locate_classifies_without_downloading(spec, kind):
    assert locate(spec).kind == kind


def test_locate_local_forms(tiny_hf, tmp_path):
    assert locate(str(tiny_hf)) == locate(tiny_hf)
    assert locate(tiny_hf).kind == "hf" and locate(tiny_hf).path == tiny_hf
    gguf = tmp_path / "only" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    assert locate(gguf).kind == "gguf" and locate(gguf.parent).path == gguf  # a folder holding one GGUF


@pytest.mark.parametrize("spec, words", [
    ("nonexistent.gguf", "no such file or folder: nonexistent.gguf"),
    ("./models/qwen", "no such file or folder: ./models/qwen"),
    ("/no/such/dir/model", "no such file or folder"),
    ("a/b/c", "no such file or folder: a/b/c"),
    ("nonexistent-model", "unknown model 'nonexistent-model': not a file or folder here, not one of the packaged"),
])  # fmt: skip
def test_missing_paths_and_unknown_names_say_so(spec, words):
    with pytest.raises(WeightsError) as e:
        locate(spec)
    assert words in str(e.value) and "offline" not in str(e.value) and "hub" not in str(e.value).split(":")[0]


@pytest.mark.parametrize("name, words", [
    ("tpu", "unknown device 'tpu'"), ("cuda:x", "unknown device"), ("meta", "not supported"),
])  # fmt: skip
def test_unusable_devices_are_option_errors(name, words):
    with pytest.raises(OptionError, match=words):
        resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_says_why():
    with pytest.raises(OptionError, match="device 'cuda': (this build of torch .* has no CUDA|no such CUDA device)"):
        resolve_device("cuda")


@pytest.mark.parametrize("kernels, device, world, words", [
    ("triton", "cpu", 1, "--kernels triton runs on CUDA, not cpu: our compiled kernels already run there"),
    ("triton", "cuda", 2, "does not run under tensor parallelism"),
    ("cuda", "cuda", 1, "unknown kernels 'cuda'; choose one of auto"),
])  # fmt: skip
def test_a_kernels_choice_the_run_cannot_take_is_refused_with_what_to_use(kernels, device, world, words):
    with pytest.raises(OptionError, match=words):
        check_kernels(kernels, device, world)
    check_kernels("auto", device, world)  # torch's and our compiled kernels run everywhere


def test_load_refuses_triton_kernels_on_the_cpu_before_reading_weights(tiny_hf):
    with pytest.raises(OptionError, match="--kernels triton runs on CUDA"):
        load(tiny_hf, device="cpu", kernels="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="our Triton kernels are chosen on CUDA only")
def test_triton_kernels_run_the_int4_layers_and_the_decode_step_on_cuda(tiny_hf):
    from qwen2.engine.triton_decode import TritonDecode
    from qwen2.quant.triton_int4 import TritonInt4Linear

    llm = load(tiny_hf, device="cuda", quant="int4", kernels="triton")
    assert isinstance(llm.model.decode_step, TritonDecode)
    assert isinstance(llm.model.model.layers[0].mlp.down_proj, TritonInt4Linear)


@pytest.mark.parametrize("ctx", [0, -5, 2.5])
def test_ctx_must_be_positive(tiny_hf, ctx):
    with pytest.raises(OptionError, match="--ctx must be a positive number of tokens"):
        load(tiny_hf, ctx=ctx, quant="none")


def test_ctx_defaults_to_8192_or_the_model_limit_and_never_beyond(tiny_hf):
    llm = load(tiny_hf, quant="none")
    assert llm.engine.max_seq_len == min(DEFAULT_CTX, llm.config.context_limit) == 512
    assert load(tiny_hf, quant="none", ctx=100).engine.max_seq_len == 100
    with pytest.raises(OptionError, match="a KV cache of 4096 tokens per sequence \\(--ctx\\) exceeds the model's "
                                          "context limit of 512 tokens"):
        load(tiny_hf, quant="none", ctx=4096)
    assert load(tiny_hf, quant="none", ctx=2048, rope_scaling="yarn:4").engine.max_seq_len == 2048


def test_dca_without_ctx_keeps_a_bounded_cache(tiny_hf):
    llm = load(tiny_hf, quant="none", dca="256:32")
    assert llm.config.context_limit == 1_048_576 and llm.engine.max_seq_len == DEFAULT_CTX


def test_load_model_is_the_network_alone(tiny_hf, tiny_model):
    model, tokenizer = load_model(tiny_hf, quant="none", dtype="float32", device="cpu")
    ids = torch.tensor([tokenizer.encode("def fib(n):")])
    with torch.inference_mode():
        assert torch.equal(model(ids), tiny_model(ids))


def test_shapes_that_disagree_with_the_config_are_a_weights_error(tiny_hf, tmp_path):
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    for f in tiny_hf.iterdir():
        (wrong / f.name).write_bytes(f.read_bytes())
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps(config | {"intermediate_size": 96}))
    with pytest.raises(WeightsError, match=r"does not match its config: .*mlp.* is \(128, 64\), the config implies "
                                           r"\(96, 64\)"):
        load_model(wrong, quant="none")


@pytest.mark.parametrize("quantization, phrase", [
    ({"quant_method": "gptq"}, r"quantization_config \(gptq\) has bits=None"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128}, "AWQ quantization_config but no Linear layer is stored"),
    ({"quant_method": "bitsandbytes", "bits": 4}, "only GPTQ and AWQ 4-bit checkpoints are supported"),
])
def test_quantized_checkpoints_we_cannot_run_are_refused_by_name(tiny_hf, tmp_path, quantization, phrase):
    folder = tmp_path / "quantized"
    folder.mkdir()
    for f in tiny_hf.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"quantization_config": quantization}))
    for quant in ("auto", "none"):
        with pytest.raises(WeightsError, match=phrase):
            load_model(folder, quant=quant)


def test_the_command_line_parser_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys; from qwen2.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"  # `qwen2 --help` and a mistyped option answer at once
