"""The reward model (qwen2.train.reward): last-token scores under either padding, the
Bradley-Terry loss, the transformers Qwen2ForSequenceClassification layout, and training
through the one trainer."""

import copy
import json
import math

import pytest
import torch

from qwen2.train.config import TrainConfig
from qwen2.train.reward import RewardModel, bradley_terry, load_reward_model, pad_batch, save_hf, score
from qwen2.train.trainer import Trainer

END_ID = 151645  # <|im_end|>, the tiny config's eos
PAD_ID = 151643  # <|endoftext|>, the tokenizer's pad


@pytest.fixture(scope="module")
def reward_model(tiny_model):
    torch.manual_seed(0)
    return RewardModel(copy.deepcopy(tiny_model), std=0.02).eval()  # a drawn head, so scores differ


SEQUENCES = [[5, 6, 7, END_ID], [9, 10, END_ID, PAD_ID, PAD_ID], [3]]  # the second ends in pad-valued tokens


def test_the_score_is_read_at_the_last_real_token_with_left_or_right_padding(reward_model):
    _, _, _, last_right = pad_batch(SEQUENCES, PAD_ID)
    _, _, _, last_left = pad_batch(SEQUENCES, PAD_ID, left=True)
    assert last_right.tolist() == [3, 4, 0] and last_left.tolist() == [4, 4, 4]
    with torch.no_grad():
        alone = torch.cat([score(reward_model, [s], PAD_ID) for s in SEQUENCES])
        right = score(reward_model, SEQUENCES, PAD_ID)
        left = score(reward_model, SEQUENCES, PAD_ID, left=True)
    assert torch.allclose(right, alone, atol=1e-5) and torch.allclose(left, alone, atol=1e-5)
    assert len(set(alone.tolist())) == 3


def test_bradley_terry_with_margin_and_centering_equals_a_direct_computation():
    chosen, rejected = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.0, 0.5, 2.5])
    margin, c = torch.tensor([0.5, 0.0, 1.0]), 0.01
    expected = sum(-math.log(1 / (1 + math.exp(-(a - b - m)))) for a, b, m in zip(chosen.tolist(), rejected.tolist(),
                                                                                   margin.tolist())) / 3
    expected += c * sum((a + b) ** 2 for a, b in zip(chosen.tolist(), rejected.tolist())) / 3
    assert bradley_terry(chosen, rejected, margin, c).item() == pytest.approx(expected, rel=1e-6)
    assert bradley_terry(torch.zeros(2), torch.zeros(2)).item() == pytest.approx(math.log(2))


def test_the_saved_reward_model_loads_in_transformers_with_equal_scores(reward_model, default_tokenizer, tmp_path):
    from transformers import AutoModelForSequenceClassification

    save_hf(reward_model, default_tokenizer, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForSequenceClassification"] and config["num_labels"] == 1
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path, dtype=torch.float32).eval()
    batch = [s for s in SEQUENCES if s[-1] != PAD_ID]  # transformers finds the end by the pad id
    with torch.no_grad():
        ours = score(reward_model, batch, PAD_ID)
        tokens, _, _, _ = pad_batch(batch, PAD_ID)
        theirs = hf(input_ids=tokens, attention_mask=(tokens != PAD_ID).long()).logits[:, 0]
        left, _, _, _ = pad_batch(batch, PAD_ID, left=True)
        theirs_left = hf(input_ids=left, attention_mask=(left != PAD_ID).long()).logits[:, 0]
        ours_again = score(load_reward_model(tmp_path)[0], batch, PAD_ID)
    assert torch.allclose(ours, theirs, atol=1e-4) and torch.allclose(ours, theirs_left, atol=1e-4)
    assert torch.equal(ours, ours_again)


def test_training_separates_chosen_from_rejected_on_held_out_pairs(tiny_hf, tmp_path):
    rows = [{"prompt": f"Is {i} even?", "chosen": "Let me check.", "rejected": "Whatever."} for i in range(10)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer = Trainer(TrainConfig.from_flat(dict(data=str(data), out=str(tmp_path / "rm"), task="rm",
                                                 model=str(tiny_hf), steps=6, lr=1e-2, heldout=0.2, max_len=64,
                                                 device="cpu", bf16=False, progress=False, lora_rank=4, center=0.01)))
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["eval_accuracy"] == 1.0 and rows[-1]["eval_margin"] > rows[0]["eval_margin"]
    assert 0 < rows[-1]["eval_accuracy_low"] < 1.0 == rows[-1]["eval_accuracy_high"]  # Wilson, 2 held-out pairs
    assert rows[0]["eval_accuracy"] == 0.5 and rows[0]["eval_loss"] == pytest.approx(math.log(2))  # ties at zero
    model, _ = load_reward_model(tmp_path / "rm")
    (pair,) = trainer.task.heldout[:1]
    with torch.no_grad():
        chosen, rejected = score(model, [pair.prompt + pair.chosen, pair.prompt + pair.rejected], PAD_ID)
    assert chosen > rejected


def test_the_head_starts_at_zero_so_the_first_loss_is_ln_2_and_learns_faster_than_the_body(tiny_hf, tmp_path):
    rows = [{"prompt": f"Is {i} even?", "chosen": "Let me check.", "rejected": "Whatever."} for i in range(6)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer = Trainer(TrainConfig.from_flat(dict(data=str(data), out=str(tmp_path / "rm"), task="rm",
                                                 model=str(tiny_hf), steps=1, lr=1e-3, head_lr_scale=10, heldout=0.0,
                                                 max_len=64, device="cpu", bf16=False, progress=False, lora_rank=4)))
    assert not trainer.model.score.weight.any()
    first = trainer.train_step()
    assert first["loss"] == pytest.approx(math.log(2), abs=0.01)
    (head,) = trainer.model.score.parameters()
    lrs = {id(p): group["lr"] for group in trainer.optimizer.param_groups for p in group["params"]}
    assert lrs[id(head)] == pytest.approx(10 * trainer.scheduler.get_last_lr()[0])
    assert trainer.model.score.weight.any()
