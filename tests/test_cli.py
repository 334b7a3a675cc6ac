"""The `qwen2` command line as a user meets it: real processes, one-line errors, no tracebacks."""

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
