"""`qwen2 train`: a TOML config sets the options (the flat keys of every task, mapped into the one
nested config), flags override it, each task gets its own defaults, and mistakes are one line."""

import pytest

from qwen2.cli import build_parser
from qwen2.errors import OptionError
from qwen2.train.cli import config_from
from qwen2.train.config import TrainConfig


def parse(*argv):
    return build_parser().parse_args(["train", *argv])


def test_a_config_file_sets_the_keys_and_flags_override_it(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('data = "chat.jsonl"\nout = "run"\nlora_rank = 8\nlr = 1e-4\nsteps = 100\npack = true\n')
    config = config_from(parse("sft", "--config", str(toml), "--lr", "3e-4", "--steps", "7"))
    assert (config.data.path, config.out, config.lora.rank, config.data.pack) == ("chat.jsonl", "run", 8, True)
    assert (config.optim.lr, config.steps, config.data.batch_size) == (3e-4, 7, 4)  # flags win; the rest: defaults


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
    toml = tmp_path / "run.toml"
    toml.write_text('data = "chat.jsonl"\nout = "run"\nkeep = 0\n')
    with pytest.raises(OptionError, match="--keep must be at least 1"):
        config_from(parse(command, "--config", str(toml))).check()


def test_a_preference_task_reads_its_own_section_and_the_shared_ones_from_the_same_flat_keys(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('data = "pairs.jsonl"\nout = "run"\nbeta = 0.3\nloss = "robust"\noptimizer = "ondare"\n'
                    'reserve_rate = 0.5\nlora_rank = 4\nsave_every = 3\n')
    config = config_from(parse("dpo", "--config", str(toml), "--device", "cpu", "--no-bf16"))
    assert (config.task, config.dpo.beta, config.dpo.loss, config.dpo.smoothing) == ("dpo", 0.3, "robust", 0.1)
    assert (config.optim.name, config.optim.reserve_rate, config.lora.rank) == ("ondare", 0.5, 4)
    assert (config.checkpoint.save_every, config.parallel.device, config.parallel.bf16) == (3, "cpu", False)
    flat = config.flat()  # train_config.json: the keys --config takes, so a run's settings can be read back
    assert TrainConfig.from_flat(flat) == config and flat["model"] is None and flat["data"] == "pairs.jsonl"


@pytest.mark.parametrize("task, batch_size, max_len, warmup, heldout, lr", [
    ("sft", 4, 1024, 0.05, 0.0, 2e-5),
    ("pretrain", 4, 1024, 0.05, 0.05, 1e-3),
    ("rm", 2, 512, 0.1, 0.1, 1e-5),
    ("dpo", 2, 512, 0.1, 0.1, 1e-6),
    ("online-dpo", 2, 512, 0.1, 0.1, 1e-6),
])  # fmt: skip
def test_each_task_keeps_its_own_defaults(task, batch_size, max_len, warmup, heldout, lr):
    config = TrainConfig.from_flat(dict(task=task, data="d", out="o"))
    d = config.data
    assert (d.batch_size, d.max_len, config.optim.warmup, d.heldout, config.learning_rate) == (
        batch_size, max_len, warmup, heldout, lr)
    given = TrainConfig.from_flat(dict(task=task, data="d", out="o", batch_size=3, holdout=0.2))  # pretrain's old name
    assert (given.data.batch_size, given.data.heldout) == (3, 0.2)


def test_fsdp2_takes_lora_resume_the_preference_tasks_and_a_merging_optimizer_to_resume(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('parallel = "fsdp"\nlora_rank = 4\nresume = true\n')
    for task in ("sft", "rm", "dpo"):
        config_from(parse(task, "--data", "d", "--out", "o", "--config", str(toml))).check()
    for optimizer in ("ondare", "onties"):
        config_from(parse("dpo", "--data", "d", "--out", "o", "--config", str(toml), "--optimizer", optimizer)).check()
