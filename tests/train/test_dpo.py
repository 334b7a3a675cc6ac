"""Offline DPO (qwen2.train.dpo, logprobs) through the one trainer: chunked log-probs, the three
losses, the reference."""

import copy
import json
import math

import pytest
import torch

from qwen2.train import logprobs
from qwen2.train.config import TrainConfig
from qwen2.train.dpo import DPOTask, dpo_loss
from qwen2.train.preference import Pair, pair_batch
from qwen2.train.trainer import Trainer
from tests.conftest import PickledPayload

DPO_KEYS = {"loss", "reward_margin", "reward_accuracy", "chosen_logp", "rejected_logp", "kl"}


def _pairs_file(tmp_path, n=8):
    rows = [{"prompt": f"Question {i}: is {i} a number?", "chosen": "Yes, it is.", "rejected": "No way."}
            for i in range(n)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(tiny_hf, tmp_path, **kw):
    fields = dict(task="dpo", data=str(_pairs_file(tmp_path)), out=str(tmp_path / "out"), model=str(tiny_hf),
                  device="cpu", bf16=False, progress=False, heldout=0.25, batch_size=2, max_len=64)
    return TrainConfig.from_flat(fields | kw)


@pytest.mark.parametrize("head", ["trained", "frozen"])
def test_chunked_log_probs_and_gradients_equal_a_full_log_softmax(tiny_model, monkeypatch, head):
    monkeypatch.setattr(logprobs, "CHUNK", 5)  # several chunks per batch
    model = copy.deepcopy(tiny_model).double()
    if head == "frozen":  # as under LoRA: the backward pass takes the slopes kept by the forward pass
        model.lm_head.weight.requires_grad_(False)
    torch.manual_seed(0)
    pairs = [Pair(torch.randint(0, 1000, (n,)).tolist(), torch.randint(0, 1000, (c,)).tolist(),
                  torch.randint(0, 1000, (r,)).tolist(), "x") for n, c, r in [(4, 6, 3), (7, 2, 9)]]
    tokens, positions, segments, targets, _ = pair_batch(pairs, 0)
    sums, counts = logprobs.sequence_logps(model, tokens, positions, segments, targets)
    weights = torch.randn(4, dtype=torch.float64)
    (sums * weights).sum().backward()
    ours = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    logp = torch.log_softmax(model(tokens, positions), -1)  # (B, T, V) whole
    mask = targets != -100
    direct = (logp.gather(2, targets.clamp(min=0)[..., None])[..., 0] * mask).sum(1)
    (direct * weights).sum().backward()
    assert counts.tolist() == [6, 2, 3, 9]
    assert torch.allclose(sums.double(), direct, atol=1e-5)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert len(ours) == len(trained)
    for a, p in zip(ours, trained):
        assert torch.allclose(a, p.grad, atol=1e-6)


def test_losses_equal_a_direct_float64_computation():
    torch.manual_seed(0)
    lp = [torch.randn(16, dtype=torch.float64) * 20 for _ in range(4)]
    beta, e = 0.1, 0.2
    for i in range(16):
        h = (lp[0][i] - lp[2][i]).item() - (lp[1][i] - lp[3][i]).item()
        log_sig = -math.log1p(math.exp(-beta * h))
        log_sig_neg = -math.log1p(math.exp(beta * h))
        expected = {
            "sigmoid": -(1 - e) * log_sig - e * log_sig_neg,
            "robust": ((1 - e) * -log_sig - e * -log_sig_neg) / (1 - 2 * e),
            "ipo": (h - 1 / (2 * beta)) ** 2,
        }
        for kind, value in expected.items():
            got = dpo_loss(*(t[i: i + 1] for t in lp), beta, kind, e).item()
            assert got == pytest.approx(value, rel=1e-12, abs=1e-12), kind
    assert dpo_loss(*(torch.zeros(1),) * 4, 0.1).item() == pytest.approx(math.log(2))


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_cached_reference_log_probs_equal_live_ones_before_and_after_training(tiny_hf, tmp_path, lora_rank):
    trainer = Trainer(_config(tiny_hf, tmp_path, lora_rank=lora_rank, steps=2, lr=1e-2))
    task = trainer.task
    # full fine-tuning: the frozen copy is released once its values are cached; a live trainer keeps one
    live = task if lora_rank else Trainer(_config(tiny_hf, tmp_path, out=str(tmp_path / "live"),
                                                  precompute_ref=False)).task
    assert (task.ref_model is None) and (live.ref_model is not None) == (not lora_rank)
    pairs = task.train_data + task.heldout
    cached = task.reference(pairs)
    for a, b in zip(cached, live.reference_live(pairs)):
        assert torch.allclose(a, b, atol=1e-4) and a.abs().min() > 1
    for _ in range(2):  # the policy moves; its reference must not
        trainer.train_step()
    assert any((p.detach() != 0).any() for p in trainer.params)
    for a, b in zip(task.reference(pairs), live.reference_live(pairs)):
        assert torch.allclose(a, b, atol=1e-4)
    again = Trainer(_config(tiny_hf, tmp_path, lora_rank=lora_rank)).task  # read back from out/ref_logps.pt
    assert again.cache == task.cache


@pytest.mark.parametrize("bad", ["would run code", "truncated"])
def test_a_bad_reference_cache_is_not_run_but_computed_again_and_replaced(tiny_hf, tmp_path, capsys, bad):
    first = Trainer(_config(tiny_hf, tmp_path)).task
    path, marker = tmp_path / "out" / "ref_logps.pt", tmp_path / "payload-ran"
    if bad == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    else:
        torch.save(torch.load(path, weights_only=True) | {"index": PickledPayload(marker)}, path)
    capsys.readouterr()
    again = Trainer(_config(tiny_hf, tmp_path)).task
    assert "warning:" in capsys.readouterr().err and not marker.exists()
    assert again.cache == first.cache
    assert Trainer(_config(tiny_hf, tmp_path)).task.cache == first.cache
    assert "warning:" not in capsys.readouterr().err  # the rewritten cache read back cleanly
    assert sorted(p.name for p in path.parent.iterdir() if "ref_logps" in p.name) == ["ref_logps.pt"]


def test_training_raises_held_out_preference_accuracy_and_logs_every_key(tiny_hf, tmp_path):
    trainer = Trainer(_config(tiny_hf, tmp_path, steps=12, lr=3e-3, beta=0.5, eval_every=6))
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert all(DPO_KEYS <= set(r) for r in rows[1:])
    assert rows[0]["eval_accuracy"] == 0.0 and rows[-1]["eval_accuracy"] == 1.0
    assert rows[-1]["eval_margin"] > rows[0]["eval_margin"]
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_the_cli_runs_lora_dpo_with_a_merging_optimizer_and_refuses_a_foreign_reference(tiny_hf, tmp_path, capsys):
    import shutil

    from qwen2.cli import main

    data, out = _pairs_file(tmp_path), tmp_path / "run"
    main(["train", "dpo", "--model", str(tiny_hf), "--data", str(data), "--out", str(out), "--steps", "2",
          "--lora-rank", "4", "--optimizer", "onties", "--loss", "ipo", "--max-len", "64", "--device", "cpu"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 2
    assert (out / "adapter" / "adapter_model.safetensors").exists() and (out / "metrics.png").exists()
    foreign = tmp_path / "foreign"
    shutil.copytree(tiny_hf, foreign)
    tok = json.loads((foreign / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["!"], vocab['"'] = vocab['"'], vocab["!"]
    (foreign / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(SystemExit) as exit_:
        main(["train", "dpo", "--model", str(tiny_hf), "--ref", str(foreign), "--data", str(data),
              "--out", str(tmp_path / "x"), "--steps", "1", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 1 and len(err) == 1 and "different tokenizer" in err[0], err


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "robust"])
def test_losses_and_metrics_equal_trl_dpo_trainer_on_the_same_log_probs(kind):
    """TRL's own DPOTrainer._compute_loss runs on given per-token log-probs: its model, accelerator
    and logging are stand-ins (a real TRL training run needs its datasets stack and a hub-style model)."""
    from collections import defaultdict
    from types import SimpleNamespace

    dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer", reason="TRL (a test-time oracle) is not installed")
    torch.manual_seed(0)
    n, T = 3, 7
    mask = torch.zeros(2 * n, T + 1)
    for row, (start, end) in enumerate([(2, 6), (3, 8), (1, 4), (2, 8), (4, 7), (1, 3)]):
        mask[row, start:end] = 1  # the reply tokens; prompt before, padding after
    per_token = -torch.rand(2 * n, T, dtype=torch.float64) * 3 * mask[:, 1:]
    ref = -torch.rand(2 * n, dtype=torch.float64) * 10
    beta, e = 0.1, 0.2 if kind == "robust" else 0.0
    outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros(2 * n, T), mean_logits=torch.zeros(2 * n, T),
                              is_top1=torch.zeros(2 * n, T, dtype=torch.bool))
    accelerator = SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x)
    stub = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False,
                           ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                           loss_types=[kind], loss_weights=[1.0], beta=beta, label_smoothing=e, use_weighting=False,
                           _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(2 * n, T + 1, dtype=torch.long), "attention_mask": torch.ones(2 * n, T + 1),
              "completion_mask": mask, "ref_chosen_logps": ref[:n], "ref_rejected_logps": ref[n:]}
    theirs = dpo_trainer.DPOTrainer._compute_loss(stub, lambda **kw: outputs, inputs, False)
    sums, lengths = per_token.sum(1), mask[:, 1:].sum(1)
    lp = {"chosen": sums[:n], "rejected": sums[n:], "ref_chosen": ref[:n], "ref_rejected": ref[n:],
          "chosen_len": lengths[:n], "rejected_len": lengths[n:]}
    task = SimpleNamespace(config=TrainConfig.from_flat(dict(data="x", out="y", task="dpo", beta=beta, loss=kind,
                                                            label_smoothing=e)))
    ours, metrics = DPOTask.preference_loss(task, lp)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-9)
    logged = stub._metrics["train"]
    assert metrics["reward_margin"] == pytest.approx(logged["rewards/margins"][0], rel=1e-9)
    assert metrics["reward_accuracy"] == pytest.approx(logged["rewards/accuracies"][0])
    assert metrics["chosen_logp"] == pytest.approx(logged["logps/chosen"][0], rel=1e-9)


@pytest.mark.parametrize("argv, words", [
    (["dpo", "--data", "/nonexistent.jsonl", "--out", "o"], "no such data file or folder: /nonexistent.jsonl"),
    (["dpo", "--data", "d", "--out", "o", "--beta", "0"], "--beta must be positive"),
    (["dpo", "--data", "d", "--out", "o", "--loss", "robust", "--label-smoothing", "0.5"], "--label-smoothing"),
    (["dpo", "--data", "d", "--out", "o", "--lora-rank", "4", "--optimizer", "ondare", "--base", "b"],
     "a LoRA adapter has no SFT delta"),
    (["dpo", "--data", "d", "--out", "o", "--base", "b"], "--base is for --optimizer ondare or onties"),
    (["online-dpo", "--data", "d", "--out", "o"], "online-dpo needs --reward-model"),
    (["rm", "--data", "d", "--out", "o", "--batch-size", "0"], "--batch-size must be at least 1"),
])  # fmt: skip
def test_mistakes_are_one_line_before_any_model_loads(argv, words, capsys):
    from qwen2.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["train", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 1 and len(err) == 1 and words in err[0], err
