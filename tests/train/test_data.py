"""Training data: the loss falls on exactly the assistant tokens, the prompt is tokenized as at
inference, the three record shapes convert, bad records are reported by line, packing keeps
samples apart."""

import json

import pytest

from qwen2.errors import DataError
from qwen2.train.data import IGNORE, Sample, collate, load_chat, load_corpus, make_rows, render, to_messages

CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": CITY}}]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "assistant", "content": "21 °C, 晴れ."},
]


def targets_text(tokenizer, ids, weights):
    return tokenizer.decode([t for t, w in zip(ids, weights) if w])


def test_loss_falls_on_exactly_the_assistant_turns_with_their_end_token(default_tokenizer):
    ids, weights = render(default_tokenizer, CONVERSATION, TOOLS)
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
    assert targets_text(default_tokenizer, ids, weights) == call + "21 °C, 晴れ.<|im_end|>"
    full = default_tokenizer.apply_chat_template(CONVERSATION, tools=TOOLS, add_generation_prompt=False)
    assert default_tokenizer.decode(ids) == full  # nothing lost, nothing added
    # token by token: each target run ends at an <|im_end|>, and the newline after it is not a target
    end = default_tokenizer.encode("<|im_end|>")[0]
    runs = [i for i in range(1, len(ids)) if weights[i - 1] and not weights[i]]
    assert len(runs) == 2 and all(ids[i - 1] == end for i in runs)


def test_each_turn_starts_where_the_inference_prompt_ends(default_tokenizer):
    ids, weights = render(default_tokenizer, CONVERSATION, TOOLS)
    first = weights.index(1.0)
    prompt = default_tokenizer.apply_chat_template(CONVERSATION[:2], tools=TOOLS, add_generation_prompt=True)
    assert ids[:first] == default_tokenizer.encode(prompt)


def test_turn_loss_weights_are_kept_and_zero_weight_turns_are_not_targets(default_tokenizer):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello", "loss_weight": 0.0},
                {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao", "loss_weight": 0.5}]
    ids, weights = render(default_tokenizer, messages)
    assert targets_text(default_tokenizer, ids, weights) == "ciao<|im_end|>"
    assert set(weights) == {0.0, 0.5}


def test_alpaca_and_sharegpt_records_convert():
    messages, tools = to_messages({"instruction": "Add the numbers.", "input": "2 3", "output": "5",
                                   "history": [["hi", "hello"]], "system": "Be exact."})
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[3]["content"] == "Add the numbers.\n2 3" and tools is None
    record = {"conversations": [{"from": "human", "value": "Weather in Paris?"},
                                {"from": "function_call", "value": json.dumps(CALL["function"])},
                                {"from": "observation", "value": '{"temp": 21}'},
                                {"from": "gpt", "value": "21 °C."}],
              "tools": json.dumps([TOOLS[0]["function"]])}
    messages, tools = to_messages(record)
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    assert messages[1]["tool_calls"] == [CALL] and tools == TOOLS
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "value": "hi"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "yo"}], "loss_weight": 1.0}]}
    assert to_messages(parts)[0][1] == {"role": "assistant", "content": "yo", "loss_weight": 1.0}


@pytest.fixture
def bad_file(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    lines = [json.dumps(good), "{not json", json.dumps({"messages": [{"content": "no role"}]}),
             json.dumps({"messages": [{"role": "user", "content": "x " * 400}, {"role": "assistant", "content": "y"}]}),
             "", json.dumps({"question": "?"}), json.dumps(good)]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_records_stop_the_run_at_their_line(bad_file, default_tokenizer):
    with pytest.raises(DataError, match=r"bad sample at chat.jsonl:2: not JSON .*--on-bad-sample skip"):
        load_chat(bad_file, default_tokenizer, max_len=128)


def test_skipped_records_are_counted_and_reported_by_line(bad_file, default_tokenizer):
    samples, report = load_chat(bad_file, default_tokenizer, max_len=128, on_bad="skip")
    assert len(samples) == report.kept == 2 and [s.where for s in samples] == ["chat.jsonl:1", "chat.jsonl:7"]
    assert [b.split(": ", 1)[0] for b in report.bad] == ["chat.jsonl:2", "chat.jsonl:3", "chat.jsonl:4", "chat.jsonl:6"]
    assert "longer than --max-len 128" in report.bad[2] and "known role" in report.bad[1]
    assert "2 samples kept, 4 bad" in report.summary()


def test_packed_rows_keep_samples_apart():
    samples = [Sample(list(range(10 * i, 10 * i + n)), [0.0] + [1.0] * (n - 1), str(i))
               for i, n in enumerate([5, 3, 6, 4])]
    rows = make_rows(samples, max_len=9, pack=True, seed=0, epoch=0)
    assert all(len(r) <= 9 for r in rows) and sum(len(r.samples) for r in rows) == 4 and len(rows) < 4
    batch = collate(rows, pad_id=0)
    for b, row in enumerate(rows):
        at = 0
        for seg, s in enumerate(row.samples):
            n = len(s.ids)
            assert batch.positions[b, at: at + n].tolist() == list(range(n))
            assert batch.targets[b, at: at + n - 1].tolist() == s.ids[1:]
            assert batch.targets[b, at + n - 1] == IGNORE  # never predict the next sample's first token
            assert (batch.segments[b, at: at + n] == seg).all()
            at += n
        assert (batch.targets[b, at:] == IGNORE).all() and (batch.segments[b, at:] == -1).all()


def test_corpus_documents_end_with_end_of_text_and_fill_blocks(tmp_path, default_tokenizer):
    text = tmp_path / "stories.txt"
    text.write_text("Once upon a time.<|endoftext|>The end came soon.<|endoftext|>")
    blocks = load_corpus(text, default_tokenizer, block=4)
    ids = [t for b in blocks for t in b.ids]
    eot = default_tokenizer.encode("<|endoftext|>")[0]
    assert ids.count(eot) == 2 and ids[-1] == eot and all(len(b.ids) <= 4 for b in blocks)
    assert default_tokenizer.decode(ids) == "Once upon a time.<|endoftext|>The end came soon.<|endoftext|>"
