"""One name per knob: every command that runs the engine takes --max-concurrency and --kv-memory,
defined once (qwen2/options.py), and the old names still parse, unlisted."""

import pytest

from qwen2.cli import build_parser


@pytest.mark.parametrize("argv, default", [(["serve"], 64), (["eval", "humaneval"], 8), (["docqa", "f", "q"], 4),
                                          (["data", "exec-feedback", "--out", "o"], 8)])
def test_every_engine_command_names_its_concurrency_and_kv_memory_alike(argv, default):
    parsed = build_parser().parse_args(argv)
    assert (parsed.max_concurrency, parsed.kv_memory) == (default, None)
    assert build_parser().parse_args([*argv, "--max-concurrency", "3", "--kv-memory", "1G"]).max_concurrency == 3


@pytest.mark.parametrize("argv, old", [(["eval", "humaneval"], "--slots"), (["docqa", "f", "q"], "--parallel"),
                                       (["data", "exec-feedback", "--out", "o"], "--slots")])
def test_the_old_flag_names_still_work_for_a_release(argv, old, capsys):
    assert build_parser().parse_args([*argv, old, "5"]).max_concurrency == 5
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv[:2], "--help"])
    assert old not in capsys.readouterr().out  # unlisted
