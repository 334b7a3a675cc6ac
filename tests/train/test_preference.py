"""Preference pairs (qwen2.train.preference): rendered as at inference, bad pairs named by line."""

import json

import pytest

from qwen2.errors import DataError, OptionError
from qwen2.tokenizer import Tokenizer
from qwen2.train.data import split
from qwen2.train.preference import Pair, check_tokenizer, heldout_group, load_pairs, load_prompts, pair_batch

END = "<|im_end|>"


def _write(tmp_path, rows, name="pairs.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prompt_and_replies_are_the_tokens_inference_uses(tmp_path, default_tokenizer):
    tok = default_tokenizer
    path = _write(tmp_path, [{"prompt": "What is 2+2?", "chosen": "4", "rejected": "5" + END},
                             {"messages": [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "hi"}],
                              "chosen": {"role": "assistant", "content": "Hello!"}, "rejected": "\ngo away"}])
    (first, second), report = load_pairs(path, tok, 512)
    assert report.kept == 2 and not report.bad
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True)
    assert first.prompt == tok.encode(prompt)  # what the engine is given
    end = tok.encode(END)
    assert first.chosen == tok.encode("4") + end and first.rejected == tok.encode("5") + end  # one end token
    assert second.rejected == tok.encode("\ngo away") + end
    # the prompt alone is a prefix of prompt + reply, and the full text is the template's
    full = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"},
                                    {"role": "assistant", "content": "4"}], add_generation_prompt=False)
    assert tok.decode(first.prompt + first.chosen) == full.rstrip("\n")


def test_the_batch_scores_the_reply_tokens_only(tmp_path, default_tokenizer):
    path = _write(tmp_path, [{"prompt": "a", "chosen": "yes please", "rejected": "no"}])
    (pair,), _ = load_pairs(path, default_tokenizer, 512)
    tokens, _, _, targets, _ = pair_batch([pair], 0)
    for row, reply in zip(targets, (pair.chosen, pair.rejected)):
        assert row[row != -100].tolist() == reply
    assert tokens[1, : len(pair.prompt) + len(pair.rejected)].tolist() == pair.prompt + pair.rejected


def test_bad_pairs_are_reported_with_their_line(tmp_path, default_tokenizer):
    path = _write(tmp_path, [{"prompt": "ok", "chosen": "a", "rejected": "b"},
                             {"prompt": "no rejected", "chosen": "a"},
                             {"prompt": "same", "chosen": "x", "rejected": "x"},
                             {"prompt": "long " * 300, "chosen": "a", "rejected": "b"},
                             {"chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match=r"pairs.jsonl:2: missing field\(s\) rejected.*--on-bad-sample skip"):
        load_pairs(path, default_tokenizer, 128)
    pairs, report = load_pairs(path, default_tokenizer, 128, on_bad="skip")
    assert len(pairs) == 1 and len(report.bad) == 4
    assert report.bad[1].startswith("pairs.jsonl:3: chosen and rejected are identical")
    assert report.bad[2].startswith("pairs.jsonl:4: the prompt has") and "--max-len 128" in report.bad[2]
    assert report.bad[3].startswith("pairs.jsonl:5: no prompt")


def test_max_prompt_len_makes_long_prompts_bad_samples(tmp_path, default_tokenizer):
    path = _write(tmp_path, [{"prompt": "short", "chosen": "a", "rejected": "b"},
                             {"prompt": "long " * 40, "chosen": "a", "rejected": "b"}])
    pairs, report = load_pairs(path, default_tokenizer, 256, on_bad="skip", max_prompt_len=32)
    assert len(pairs) == 1 and len(pairs[0].prompt) <= 32
    assert report.bad[0].startswith("pairs.jsonl:2: the prompt has") and "--max-prompt-len 32" in report.bad[0]
    assert len(load_pairs(path, default_tokenizer, 256)[0]) == 2  # without it, any prompt shorter than max-len


def test_long_replies_are_cut_to_max_len(tmp_path, default_tokenizer):
    path = _write(tmp_path, [{"prompt": "a", "chosen": "word " * 200, "rejected": "b"}])
    (pair,), _ = load_pairs(path, default_tokenizer, 64)
    assert len(pair.prompt) + len(pair.chosen) == 64


def test_the_llamafactory_dpo_demo_loads_by_name(default_tokenizer):
    from qwen2.train.datasets import data_path

    pairs, report = load_pairs(data_path("dpo_en_demo"), default_tokenizer, 4096, on_bad="skip")
    assert report.kept + len(report.bad) == 300 and report.kept >= 290
    train, heldout = split(pairs, 0.1, 0)
    assert len(heldout) == round(len(pairs) * 0.1) and not {p.index for p in train} & {p.index for p in heldout}


def test_pairs_of_one_prompt_are_held_out_together():
    # 3 prompts with 3, 2 and 1 pairs: whatever the seed, no prompt is on both sides
    pairs = [Pair([prompt], [1], [2], f"p.jsonl:{i}", index=i) for i, prompt in enumerate([7, 7, 7, 8, 8, 9])]
    for seed in range(20):
        train, heldout = split(pairs, 0.3, seed, group=lambda p: tuple(p.prompt))
        assert heldout and sorted(p.index for p in train + heldout) == list(range(6))
        assert not {p.prompt[0] for p in train} & {p.prompt[0] for p in heldout}


def test_pairs_naming_one_group_are_held_out_together(tmp_path, default_tokenizer):
    # one task asked under two constraints is two prompts but one group; a pair without a group is its prompt's
    rows = [{"prompt": f"{task} {ask}", "chosen": "a", "rejected": "b", "group": task}
            for task in "pqrs" for ask in ("in capitals", "in ten words")]
    rows += [{"prompt": "t", "chosen": "a", "rejected": "b"}, {"prompt": "t", "chosen": "c", "rejected": "d"}]
    pairs, _ = load_pairs(_write(tmp_path, rows), default_tokenizer, 128)
    assert [p.group for p in pairs] == [*"ppqqrrss", None, None]
    for seed in range(20):
        train, heldout = split(pairs, 0.3, seed, group=heldout_group)
        assert heldout and len(train) + len(heldout) == 10
        assert not {heldout_group(p) for p in train} & {heldout_group(p) for p in heldout}


def test_a_group_that_is_not_a_string_is_a_bad_pair(tmp_path, default_tokenizer):
    path = _write(tmp_path, [{"prompt": "a", "chosen": "x", "rejected": "y", "group": 3}])
    with pytest.raises(DataError, match=r"pairs.jsonl:1: 'group' must be a string"):
        load_pairs(path, default_tokenizer, 128)


def test_items_without_a_group_are_split_one_by_one():
    train, heldout = split(list(range(10)), 0.3, 0)
    assert len(heldout) == 3 and sorted(train + heldout) == list(range(10))


def test_prompts_for_online_dpo_need_no_replies(tmp_path, default_tokenizer):
    path = _write(tmp_path, [{"prompt": "a"}, {"messages": [{"role": "user", "content": "b"}]}])
    prompts, _ = load_prompts(path, default_tokenizer, 64)
    assert [len(p.chosen) for p in prompts] == [0, 0] and prompts[1].index == 1


def test_a_different_tokenizer_is_refused(tmp_path, default_tokenizer):
    default_tokenizer.save(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["!"], vocab['"'] = vocab['"'], vocab["!"]  # two ids swapped: the same tokens, other numbers
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    other = Tokenizer.from_files(tmp_path)
    check_tokenizer(default_tokenizer, default_tokenizer, "--ref", "x")
    with pytest.raises(OptionError, match="--ref other has a different tokenizer than the policy"):
        check_tokenizer(default_tokenizer, other, "--ref", "other")
