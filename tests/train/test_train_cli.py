"""`qwen2 train`: a TOML config sets the options, flags override it, and mistakes are one line."""

import pytest

from qwen2.cli import build_parser
from qwen2.errors import OptionError
from qwen2.train.cli import config_from


def parse(*argv):
    return build_parser().parse_args(["train", *argv])


def test_a_config_file_sets_the_keys_and_flags_override_it(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('data = "chat.jsonl"\nout = "run"\nlora_rank = 8\nlr = 1e-4\nsteps = 100\npack = true\n')
    config = config_from(parse("sft", "--config", str(toml), "--lr", "3e-4", "--steps", "7"))
    assert (config.data, config.out, config.lora_rank, config.pack) == ("chat.jsonl", "run", 8, True)
    assert (config.lr, config.steps, config.batch_size) == (3e-4, 7, 4)  # flags win; the rest: defaults


def test_unknown_config_keys_are_named(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('data = "x"\nout = "y"\nlearning_rate = 1e-4\n')
    with pytest.raises(OptionError, match="unknown key\\(s\\) learning_rate; the keys are the options' names"):
        config_from(parse("sft", "--config", str(toml)))


def test_data_and_out_are_required():
    with pytest.raises(OptionError, match="--data is required"):
        config_from(parse("sft", "--out", "o"))


@pytest.mark.parametrize("argv, words", [
    (["sft", "--data", "/nonexistent.jsonl", "--out", "o"], "no such data file or folder: /nonexistent.jsonl"),
    (["sft", "--data", "d", "--out", "o", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["pretrain", "--data", "d", "--out", "o", "--lr", "5"], "--lr must be in (0, 1)"),
    (["sft", "--data", "d", "--out", "o", "--parallel", "fsdp", "--lora-rank", "4"], "for LoRA or --resume use ddp"),
])  # fmt: skip
def test_mistakes_are_one_line_before_any_model_loads(argv, words, capsys):
    from qwen2.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["train", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 1 and len(err) == 1 and words in err[0], err


@pytest.mark.parametrize("command", ["sft", "pretrain", "rm", "dpo", "online-dpo"])
@pytest.mark.parametrize("value, words", [("0", "must be at least 1, got 0"), ("-1", "at least 1"),
                                          ("two", "must be a whole number")])
def test_keep_below_one_is_refused_by_the_parser(command, value, words, capsys):
    # --keep 0 once deleted every checkpoint, the one --resume needs included
    with pytest.raises(SystemExit) as exit_:
        parse(command, "--data", "d", "--out", "o", "--keep", value)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--keep" in err and words in err, err


@pytest.mark.parametrize("command", ["sft", "dpo"])
def test_keep_below_one_in_a_config_file_is_refused_too(command, tmp_path):
    from qwen2.train import align_cli

    toml = tmp_path / "run.toml"
    toml.write_text('data = "chat.jsonl"\nout = "run"\nkeep = 0\n')
    read = config_from if command == "sft" else align_cli.config_from
    with pytest.raises(OptionError, match="--keep must be at least 1"):
        read(parse(command, "--config", str(toml))).check()
