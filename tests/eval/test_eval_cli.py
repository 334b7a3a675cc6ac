"""`qwen2 eval` argument parsing (the commands themselves run in bench/long_context.py)."""

import argparse

import pytest

from qwen2.cli import Parser
from qwen2.eval.cli import add_arguments, parse_tokens


def parse(argv):
    parser = Parser(prog="qwen2")
    add_arguments(parser.add_subparsers(dest="command", required=True, parser_class=Parser))
    return parser.parse_args(argv)


def test_token_counts():
    assert [parse_tokens(t) for t in ("2k", "32K", "1500", " 4k ", "1M")] == [2048, 32768, 1500, 4096, 2**20]
    for bad in ("2x", "k", "0", "-1k"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_tokens(bad)


def test_ppl_arguments():
    args = parse(["eval", "ppl", "wiki", "--ctx", "2k,4k", "--stride", "1k", "--rope-scaling", "yarn:4"])
    assert (args.file, args.windows, args.stride, args.rope_scaling) == ("wiki", [2048, 4096], 1024, "yarn:4")
    assert parse(["eval", "ppl", "f.txt"]).windows == [2048, 4096, 8192, 16384, 32768]


def test_niah_arguments(tmp_path):
    args = parse(["eval", "niah", "--lengths", "2k,16k", "--depths", "0,50", "--needles", "2",
                  "--out", str(tmp_path / "r.json"), "--dca", "32768:4096"])
    assert (args.lengths, args.depths, args.needles, args.dca) == ([2048, 16384], [0.0, 50.0], 2, "32768:4096")
    assert parse(["eval", "niah"]).depths == [0, 25, 50, 75, 100]


def test_bad_depth_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        parse(["eval", "niah", "--depths", "0,150"])
    assert "within 0..100" in capsys.readouterr().err
