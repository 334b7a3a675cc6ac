"""The `qwen2` command line as a user meets it: real processes, one-line errors, no tracebacks."""

import io
import json
import subprocess
import sys

import pytest


def qwen2(*args, stdin=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "qwen2", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(result, *phrases):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for phrase in phrases:
        assert phrase in lines[0]


def test_unknown_option_is_one_line_with_a_hint():
    result = qwen2("generate", "-p", "hi", "--temprature", "0")
    assert_one_line_error(result, "unrecognized arguments: --temprature", "--help")
    assert result.returncode == 2


def test_unknown_command():
    assert_one_line_error(qwen2("fly"), "invalid choice")


def test_missing_model_path():
    assert_one_line_error(qwen2("generate", "-p", "hi", "--model", "/nonexistent/model.gguf"),
                          "no such file or folder")


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 10)
    assert_one_line_error(qwen2("generate", "-p", "hi", "--model", str(bad)))


def test_bad_sampling_value(default_gguf):
    assert_one_line_error(qwen2("generate", "-p", "hi", "--top-p", "3", "--model", str(default_gguf)), "top_p")


def test_info_preset_prints_official_count():
    result = qwen2("info", "--preset", "Qwen2-57B-A14B")
    assert result.returncode == 0, result.stderr
    assert "total 57,408,658,944" in result.stdout and "active per token 14,249,270,784" in result.stdout


def test_info_default_model(default_gguf):
    result = qwen2("info", "--model", str(default_gguf))
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout[result.stdout.index("{"): result.stdout.rindex("}") + 1])
    assert config["num_hidden_layers"] == 24 and config["num_key_value_heads"] == 2
    assert "weights as stored: 491,400,064 bytes" in result.stdout


def test_piped_chat_answers_once(default_gguf):
    result = qwen2("chat", "--model", str(default_gguf), "--temperature", "0", "-n", "24",
                   stdin="Reply with the single word: pong\n")
    assert result.returncode == 0, result.stderr
    assert "pong" in result.stdout.lower()


def test_generate_streams_only_the_continuation(default_gguf):
    result = qwen2("generate", "-p", "1, 2, 3, 4,", "-n", "8", "--temperature", "0", "--model", str(default_gguf))
    assert result.returncode == 0, result.stderr
    assert not result.stdout.startswith("1, 2, 3") and "5" in result.stdout


@pytest.mark.parametrize("args", [["chat", "--help"], ["generate", "--help"], ["convert", "--help"]])
def test_help_works(args):
    result = qwen2(*args)
    assert result.returncode == 0 and "usage" in result.stdout


# -- every command x every --model form, in one process -------------------------------------
# A user mistake is one line on stderr from one of our error types, the same words wherever it
# arises, and a non-zero exit. The valid forms run on tiny local models; the packaged names are
# resolved without downloading (qwen2.weights.locate), hub ids find no hub (HF_HUB_OFFLINE).

MODEL_COMMANDS = {  # command -> argv before --model; each of them takes the shared model options
    "generate": ["generate", "-p", "def fib(n):", "-n", "2", "--temperature", "0"],
    "chat": ["chat", "-n", "2", "--temperature", "0"],
    "serve": ["serve", "--port", "0"],
    "eval ppl": ["eval", "ppl", "TEXT", "--ctx", "64", "--max-tokens", "100"],
    "eval niah": ["eval", "niah", "--lengths", "200", "--depths", "50", "--answer-tokens", "2"],
}
# bench compares fixed rows (each sets its own dtype and quantization) on one GGUF: --model only
BENCH = ["bench", "--quick", "--peers", "qwen2"]


@pytest.fixture
def cli(capsys, monkeypatch, tmp_path):
    """Run `qwen2 ARGV` in this process: (exit code, stdout, stderr)."""
    from huggingface_hub import constants

    from qwen2.cli import main

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty hub cache, offline
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)

    def run(*argv, stdin=""):
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        code = 0
        try:
            main([str(text) if a == "TEXT" else a for a in argv])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, err

    return run


def assert_error_line(code, err, *phrases, exit_code=1):
    assert code == exit_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("qwen2"), lines[0]
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_every_command_takes_the_same_model_options(command):
    from qwen2.cli import build_parser
    from qwen2.options import model_options

    argv = ["x" if a == "TEXT" else a for a in MODEL_COMMANDS[command]]
    given = dict(model="m.gguf", dtype="float32", device="cpu", quant="none", rope_scaling="yarn:2", dca="64")
    options = [w for k, v in given.items() for w in (f"--{k.replace('_', '-')}", v)]
    assert model_options(build_parser().parse_args(argv + options)) == given
    # nothing given: load()'s own defaults apply, the same for every command
    assert model_options(build_parser().parse_args(argv)) == {}


def test_bench_takes_the_model_as_every_command_does():
    from qwen2.cli import build_parser
    from qwen2.options import model_options

    assert model_options(build_parser().parse_args([*BENCH, "--model", "m.gguf"])) == {"model": "m.gguf"}


BAD_MODELS = {
    "missing file": ("nonexistent.gguf", "no such file or folder: nonexistent.gguf"),
    "missing folder": ("/nonexistent/model", "no such file or folder: /nonexistent/model"),
    "unknown name": ("nonexistent-model", "unknown model 'nonexistent-model'"),
    "hub id offline": ("Qwen/NoSuchModel-0.5B", "could not reach the Hugging Face hub for 'Qwen/NoSuchModel-0.5B'"),
}


@pytest.mark.parametrize("form", BAD_MODELS)
@pytest.mark.parametrize("command", [*MODEL_COMMANDS, "bench", "info", "convert"])
def test_a_bad_model_is_one_line_with_the_same_words_everywhere(cli, command, form, tmp_path):
    spec, words = BAD_MODELS[form]
    if command == "convert":
        argv = ["convert", spec, str(tmp_path / "out")]
    elif command == "info":
        argv = ["info", "--model", spec]
    elif command == "bench":
        argv = [*BENCH, "--model", spec]
    else:
        argv = [*MODEL_COMMANDS[command], "--model", spec]
    if command == "bench" and form == "hub id offline":  # a hub serves safetensors, never the GGUF it compares
        words = "Qwen/NoSuchModel-0.5B is not a GGUF file: the bench compares engines on one GGUF file"
    code, _, err = cli(*argv, stdin="hi")
    assert_error_line(code, err, "qwen2: error: " + words)
    if form != "hub id offline":
        assert "offline" not in err and "Hugging Face" not in err
    else:
        assert "no such file" not in err


@pytest.fixture
def local_forms(tiny_gguf, tiny_hf, tmp_path, monkeypatch):
    """Every local --model form of the tiny model; quantized caches go to a temporary folder."""
    monkeypatch.setenv("QWEN2_CACHE", str(tmp_path / "cache"))
    return {"gguf file": str(tiny_gguf), "folder with one gguf": str(tiny_gguf.parent), "hf folder": str(tiny_hf)}


@pytest.mark.parametrize("form", ["gguf file", "folder with one gguf", "hf folder"])
def test_every_running_command_accepts_every_local_form(cli, local_forms, form, tmp_path):
    model = ["--model", local_forms[form]]
    code, out, err = cli("info", *model)
    assert code == 0 and '"hidden_size": 64' in out, err
    # a random model's two tokens may be blank: that the command ran and printed its line is what counts
    code, out, err = cli(*MODEL_COMMANDS["generate"], *model)
    assert code == 0 and out.endswith("\n") and "error" not in err, err
    code, out, err = cli(*MODEL_COMMANDS["chat"], *model, "--quant", "int8", stdin="hello")
    assert code == 0 and out.endswith("\n") and "error" not in err, err
    code, out, err = cli(*MODEL_COMMANDS["eval ppl"], *model, "--quant", "none")
    assert code == 0 and '"eval": "ppl"' in out, err
    code, out, err = cli("convert", local_forms[form], str(tmp_path / "converted"))
    assert code == 0 and (tmp_path / "converted" / "model.safetensors").exists(), err


def test_packaged_names_resolve_without_downloading():
    from qwen2.weights import locate

    for name in ("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct", "QWEN2.5-CODER-1.5B-INSTRUCT"):
        ref = locate(name)
        assert ref.kind == "packed" and ref.name == name.lower() and ref.path is None


def test_info_on_a_packaged_name_is_the_default_model(cli, default_gguf):
    code, out, err = cli("info", "--model", "qwen2.5-coder-0.5b-instruct")
    assert code == 0 and f"# {default_gguf}" in out, err
    assert "the output matrix is stored apart from the embedding (untied): 136,134,656" in out


@pytest.fixture
def broken_models(tiny_hf, tmp_path):
    """Copies of the tiny HF folder whose config no longer fits its tensors, or names GPTQ."""
    folders = {}
    gptq = {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128}}
    for name, change in (("shapes", {"intermediate_size": 96}), ("gptq", gptq)):
        folder = tmp_path / name
        folder.mkdir()
        for f in tiny_hf.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(config | change))
        folders[name] = str(folder)
    return folders


BAD_INPUTS = {
    "device tpu": (["generate", "-p", "hi", "--device", "tpu"], "unknown device 'tpu'", 1),
    "ctx negative": (["generate", "-p", "hi", "--ctx", "-5"], "token counts must be positive", 2),
    "ctx zero": (["generate", "-p", "hi", "--ctx", "0"], "token counts must be positive", 2),
    "ctx beyond the limit": (["generate", "-p", "hi", "--model", "TINY", "--ctx", "4096"],
                             "exceeds the model's context limit of 512 tokens", 1),
    "tiny temperature": (["generate", "-p", "hi", "--temperature", "1e-40"], "temperature must be 0 (greedy) or", 1),
    "huge temperature": (["chat", "--temperature", "1e9"], "temperature must be 0 (greedy) or", 1),
    "tiny repetition penalty": (["chat", "--repetition-penalty", "1e-300"], "repetition_penalty must be", 1),
    "nan top-p": (["generate", "-p", "hi", "--top-p", "nan"], "top_p must be in (0, 1]", 1),
    "stride beyond ctx": (["eval", "ppl", "TEXT", "--ctx", "64", "--stride", "128"],
                          "--stride 128 is longer than the window --ctx 64", 1),
    "missing text": (["eval", "ppl", "/nonexistent.txt"], "no such file: /nonexistent.txt", 1),
    "bad dca": (["generate", "-p", "hi", "--model", "TINY", "--dca", "abc"], "bad --dca 'abc'", 1),
    "bad rope scaling": (["generate", "-p", "hi", "--model", "TINY", "--rope-scaling", "yarn:x"],
                         "bad rope scaling 'yarn:x'", 1),
    "unknown dtype": (["generate", "-p", "hi", "--dtype", "float8"], "invalid choice: 'float8'", 2),
    "shapes disagree with config": (["generate", "-p", "hi", "--model", "SHAPES"], "does not match its config", 1),
    "gptq config over float weights": (["chat", "--model", "GPTQ"], "no Linear layer is stored packed", 1),
    "port out of range": (["serve", "--port", "70000"], "--port 70000 is not a TCP port", 1),
    "empty chat input": (["chat", "--model", "TINY"], "nothing to answer: stdin was empty", 1),
    "unknown preset": (["info", "--preset", "Qwen9-1T"], "Qwen9-1T", 1),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_clear_line(cli, case, broken_models, tiny_hf):
    argv, words, exit_code = BAD_INPUTS[case]
    names = {"TINY": str(tiny_hf), "SHAPES": broken_models["shapes"], "GPTQ": broken_models["gptq"]}
    code, _, err = cli(*[names.get(a, a) for a in argv], stdin="" if case == "empty chat input" else "hi")
    assert_error_line(code, err, words, exit_code=exit_code)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_it(cli):
    code, _, err = cli("generate", "-p", "hi", "--device", "cuda")
    assert_error_line(code, err, "device 'cuda'", "--device cpu")


def test_an_unexpected_error_is_one_line_unless_debug(cli, monkeypatch):
    import qwen2.cli

    def broken(args):
        raise RuntimeError("something inside broke")

    monkeypatch.setattr(qwen2.cli, "cmd_info", broken)
    code, _, err = cli("info", "--preset", "Qwen2-7B")
    assert_error_line(code, err, "internal error: RuntimeError: something inside broke", "--debug")
    with pytest.raises(RuntimeError, match="something inside broke"):
        qwen2.cli.main(["--debug", "info", "--preset", "Qwen2-7B"])
