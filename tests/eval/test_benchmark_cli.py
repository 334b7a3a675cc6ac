"""`qwen2 eval humaneval|mmlu|asdiv|ifeval|multilingual|safety`: the shared options and their errors."""

import pytest

from qwen2.cli import Parser, main
from qwen2.eval.cli import add_arguments


def parse(argv):
    parser = Parser(prog="qwen2")
    add_arguments(parser.add_subparsers(dest="command", required=True, parser_class=Parser))
    return parser.parse_args(argv)


@pytest.mark.parametrize("name", ["humaneval", "mmlu", "asdiv", "ifeval", "multilingual", "safety"])
def test_every_benchmark_takes_the_shared_options(name, tmp_path):
    args = parse(["eval", name, "--limit", "7", "--seed", "3", "--json", str(tmp_path / "r.json"), "--model", "m.gguf"])
    assert (args.limit, args.seed, args.json, args.model) == (7, 3, tmp_path / "r.json", "m.gguf")


def test_an_unknown_eval_lists_the_valid_ones(capsys):
    with pytest.raises(SystemExit):
        parse(["eval", "gsm8k"])
    err = capsys.readouterr().err
    assert all(name in err for name in ("humaneval", "mmlu", "asdiv", "ifeval", "multilingual", "safety"))


def test_an_unknown_humaneval_format_lists_the_valid_ones(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "humaneval", "--format", "fim", "--limit", "1"])
    assert "unknown format 'fim'; choose one of chat, completion" in capsys.readouterr().err


def test_safety_without_its_data_says_how_to_give_it(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "safety"])
    assert "give --data PATH to MultiJail.csv" in capsys.readouterr().err


def test_a_zero_limit_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "mmlu", "--limit", "0"])
    assert "--limit must be at least 1" in capsys.readouterr().err
