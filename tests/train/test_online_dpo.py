"""Online DPO (qwen2.train.online_dpo) through the one trainer: samples from the live weights
through the engine (or from a Q8_0 copy of them made for each step), best vs worst by the reward
model or the verifier, a penalty for replies that never end, two torchrun processes (DDP, or
FSDP2 sampling from a copy gathered from the shards) taking the steps of one, and a run killed with
SIGKILL resuming to the same samples and losses."""

import copy
import json
import weakref

import pytest
import torch

from qwen2.engine.engine import Engine
from qwen2.engine.sampling import SamplingParams
from qwen2.errors import DataError, OptionError
from qwen2.eval.instructions import render
from qwen2.quant.blocks import kernels_available
from qwen2.train.config import TrainConfig
from qwen2.train.dpo import lora_off
from qwen2.train.online_dpo import checks, verified
from qwen2.train.reward import RewardModel, save_hf, score
from qwen2.train.trainer import Trainer
from tests.train.test_align import TORCHRUN, metrics, one_and_two_processes, qwen2_cli
from tests.train.test_trainer import kill_when_paused

END_ID = 151645  # <|im_end|>


def random_reward_model(tiny_model, tokenizer, folder):
    """A reward model of the tiny body with a random head (scores differ), saved in `folder`."""
    torch.manual_seed(0)
    save_hf(RewardModel(copy.deepcopy(tiny_model), std=0.02), tokenizer, folder)
    return folder


@pytest.fixture(scope="module")
def reward_model(tiny_model, default_tokenizer, tmp_path_factory):
    return random_reward_model(tiny_model, default_tokenizer, tmp_path_factory.mktemp("rm"))


@pytest.fixture(scope="module")
def trainer(tiny_hf, reward_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("online")
    data = folder / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Count to {i}."}) + "\n" for i in range(4)))
    config = dict(data=str(data), out=str(folder / "out"), task="online-dpo", model=str(tiny_hf),
                  reward_model=str(reward_model), samples=2, max_new_tokens=4, lora_rank=4, steps=1,
                  lr=1e-2, heldout=0.25, max_len=64, device="cpu", bf16=False, progress=False, sample_quant="none")
    return Trainer(TrainConfig.from_flat(config))


def _fresh_engine_samples(model, tokenizer, prompts, n, seed):
    engine = Engine(copy.deepcopy(model).eval(), tokenizer, max_concurrency=min(16, 2 * n), max_seq_len=128)
    requests = [[engine.submit(p, SamplingParams(max_tokens=4, temperature=1.0, seed=seed + 1000 * i + j))
                 for j in range(n)] for i, p in enumerate(prompts)]
    while engine.has_work:
        engine.step()
    return [[(r.output, r.finish_reason == "stop") for r in rs] for rs in requests]


def test_samples_come_from_the_live_weights(trainer):
    prompts = [p.prompt for p in trainer.task.train_data[:2]]
    before = trainer.task.generate(prompts, 2, 1.0, seed=7)
    assert before == _fresh_engine_samples(trainer.model, trainer.tokenizer, prompts, 2, 7)
    with torch.no_grad():  # an update of the LoRA adapters, as an optimizer step makes
        for p in trainer.params:
            p.add_(torch.randn_like(p) * 0.5)
    after = trainer.task.generate(prompts, 2, 1.0, seed=7)
    assert after != before
    assert after == _fresh_engine_samples(trainer.model, trainer.tokenizer, prompts, 2, 7)


@pytest.mark.skipif(not kernels_available(), reason="the Q8_0 snapshot runs on our CPU kernels, not built here")
def test_a_q8_0_snapshot_samples_the_current_weights_lora_included(trainer):
    task, prompts = trainer.task, [p.prompt for p in trainer.task.train_data[:2]]
    live, engine, trained = task.sample_quant, task.engine, [p.detach().clone() for p in trainer.params]
    task.sample_quant, task.engine = "q8_0", None
    try:
        torch.manual_seed(0)  # whatever the tests before this one did to the adapters
        with torch.no_grad():
            for p in trainer.params:  # adapters far from zero, so the snapshot must carry them
                p.copy_(torch.randn_like(p) * 0.1)  # larger, and this random model's activations blow up
        tokens = torch.tensor([prompts[0]])
        snapshot = task.snapshot_engine().model
        with torch.no_grad():
            ours, policy = snapshot(tokens)[0, -1], trainer.model.eval()(tokens)[0, -1]
            with lora_off(trainer.model):
                base = trainer.model(tokens)[0, -1]
        # within Q8_0's rounding of the policy (int8 activations too: ~1% on this random model, over
        # five seeds), and far nearer to it than the weights without LoRA are (2-4% of that distance)
        error = (ours - policy).norm()
        assert error < 0.1 * policy.norm() and error < 0.1 * (base - policy).norm()
        made, snapshot_engine = [], task.snapshot_engine

        def recorded():
            engine = snapshot_engine()
            made.append(weakref.ref(engine.model))
            return engine

        task.snapshot_engine = recorded
        first = task.generate(prompts, 2, 1.0, seed=7)
        assert len(made) == 1 and made[0]() is None  # each step's copy is freed once it has sampled
        assert first == task.generate(prompts, 2, 1.0, seed=7)  # a copy per call, of the same weights
        with torch.no_grad():
            for p in trainer.params:
                p.add_(torch.randn_like(p) * 0.5)
        assert task.generate(prompts, 2, 1.0, seed=7) != first  # the next call sees the update
    finally:
        task.sample_quant, task.engine = live, engine
        task.__dict__.pop("snapshot_engine", None)
        with torch.no_grad():
            for p, value in zip(trainer.params, trained):
                p.copy_(value)


def test_an_unknown_sample_quant_is_refused():
    with pytest.raises(OptionError, match="--sample-quant"):
        TrainConfig.from_flat(dict(task="online-dpo", reward="verifier", sample_quant="q2")).check()


def test_pairs_are_the_best_and_worst_reply_and_unfinished_replies_are_penalised(trainer):
    prompts = trainer.task.train_data[:2]
    sampled = trainer.task.sample(prompts)
    # each prompt's replies draw seeds keyed by its place in the file, whichever prompts sample beside it
    replies = [trainer.task.generate([p.prompt], 2, 1.0, seed=trainer.config.seed * 1_000_003, keys=[p.index])[0]
               for p in prompts]
    for prompt, outs, got in zip(prompts, replies, sampled):
        with torch.no_grad():
            raw = score(trainer.task.reward_model, [prompt.prompt + t for t, _ in outs], trainer.task.pad)
        penalised = raw - torch.tensor([0.0 if done else 1.0 for _, done in outs])
        assert torch.allclose(trainer.task.rewards(prompt, outs), penalised)
        assert got.rewards == pytest.approx(penalised.tolist())
        assert got.unfinished == sum(not done for _, done in outs)
        assert got.pair.chosen == outs[int(penalised.argmax())][0]
        assert got.pair.rejected == outs[int(penalised.argmin())][0]


def test_a_run_logs_dpo_metrics_and_the_sample_reward(trainer):
    trainer.train()
    rows = [json.loads(line) for line in (trainer.out / "metrics.jsonl").read_text().splitlines()]
    assert "eval_reward" in rows[0] and "eval_reward" in rows[-1]
    assert {"loss", "reward_margin", "reward_accuracy", "chosen_logp", "rejected_logp", "kl",
            "sample_reward"} <= set(rows[-1])


def test_the_verifier_rewards_a_reply_that_states_the_gold_answer():
    assert verified({"answer": 12}, "3 * 4 = 12. The answer is 12.")
    assert verified({"answer": "1,200"}, "So the answer is $\\boxed{1200}$")  # a number, however written
    assert verified({"answer": "Paris"}, "The answer is paris.")
    assert not verified({"answer": "Paris"}, "The answer is Rome.")
    assert not verified({"answer": 12}, "3 * 4 = 13. The answer is 13.")
    assert not verified({"answer": 12}, "3 * 4 = 12")  # stated nowhere: may have been cut off


def test_verifier_online_dpo_pairs_a_verified_reply_with_a_failed_one(tiny_hf, tmp_path):
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "answer": i + 1}) + "\n" for i in range(4)))
    config = dict(data=str(data), out=str(tmp_path / "out"), task="online-dpo", model=str(tiny_hf),
                  reward="verifier", samples=2, max_new_tokens=4, lora_rank=4, steps=1, lr=1e-2,
                  heldout=0.25, max_len=64, device="cpu", bf16=True, progress=False)  # bf16: as on real CPUs
    trainer = Trainer(TrainConfig.from_flat(config))
    prompt = trainer.task.train_data[0]
    right, wrong = (trainer.tokenizer.encode(f"The answer is {n}.") + [END_ID] for n in (prompt.check["answer"], 99))
    assert trainer.task.rewards(prompt, [(right, True), (wrong, True), (right, False)]).tolist() == [1.0, 0.0, 0.0]
    last = trainer.train()  # the tiny model's samples tie at 0: the step runs without pairs
    rows = [json.loads(line) for line in (trainer.out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["eval_verified"] == 0.0 and rows[0]["eval_verified_low"] == 0.0 < rows[0]["eval_verified_high"]
    assert "sample_reward" in last


def test_verifier_online_dpo_refuses_a_prompt_with_nothing_to_check(tiny_hf, tmp_path):
    data = tmp_path / "problems.jsonl"
    data.write_text(json.dumps({"prompt": "What is 1 + 1?", "answer": 2}) + "\n" + json.dumps({"prompt": "Hi"}) + "\n")
    config = TrainConfig.from_flat(dict(data=str(data), out=str(tmp_path / "out"), task="online-dpo",
                                        model=str(tiny_hf), reward="verifier", max_len=64, device="cpu", bf16=False,
                                        progress=False))
    with pytest.raises(DataError, match=r"problems.jsonl:2 has neither"):
        Trainer(config)


def test_the_verifier_checks_instruction_constraints_the_prompt_asks_for(tiny_hf, tmp_path):
    lower = [{"kind": "case:lower"}, {"kind": "punctuation:no_comma"}]
    assert verified({"constraints": lower}, "all lower case and no commas here")
    assert not verified({"constraints": lower}, "all lower case, but a comma")
    assert not verified({"constraints": lower, "answer": 3}, "no stated answer")
    assert checks({"constraints": lower, "answer": 3}, "the answer is 3, i think") == [True, True, False]
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "Describe the sea.", "constraints": lower}) + "\n" +
                    json.dumps({"prompt": "Describe the sky.", "constraints": [{"kind": "case:loud"}]}) + "\n")
    config = TrainConfig.from_flat(dict(data=str(data), out=str(tmp_path / "out"), task="online-dpo",
                                        model=str(tiny_hf), reward="verifier", max_len=64, device="cpu", bf16=False,
                                        progress=False))
    with pytest.raises(DataError, match=r"prompts.jsonl:2.*unknown kind 'case:loud'"):
        Trainer(config)
    config.data.on_bad_sample = "skip"
    trainer = Trainer(config)
    (prompt,) = trainer.task.train_data
    asked = trainer.tokenizer.decode(prompt.prompt)
    assert "Describe the sea." in asked and all(render(c) in asked for c in lower)
    assert prompt.check == {"constraints": lower}
    texts = ("calm and blue", "calm, blue", "Calm, BLUE")
    replies = [(trainer.tokenizer.encode(text) + [END_ID], True) for text in texts]
    assert trainer.task.rewards(prompt, replies).tolist() == [1.0, 0.5, 0.0]  # the share of the checks met


def online_dpo_args(tiny_hf, data, reward_model) -> list[str]:
    """`qwen2 train online-dpo` on `data` for 2 steps, scored by `reward_model`, without --out and
    --batch-size. Temperature 5: the tiny random model puts nearly all its mass on one token, and equal
    replies make no pair."""
    return ["train", "online-dpo", "--model", str(tiny_hf), "--data", str(data), "--reward-model",
            str(reward_model), "--samples", "2", "--max-new-tokens", "4", "--temperature", "5", "--steps", "2",
            "--lr", "1e-2", "--heldout", "0.34", "--max-len", "64", "--no-bf16", "--device", "cpu",
            "--sample-quant", "none", "--save-every", "0"]


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this Python")
# DDP's replica samples as one process's model does: make test-slow (13 s); FSDP2's gathered copy stays in the suite
@pytest.mark.parametrize("parallel", [pytest.param("ddp", marks=pytest.mark.slow), "fsdp"])
def test_two_torchrun_processes_sample_and_step_as_one_process_does(parallel, tiny_hf, reward_model, tmp_path):
    # 4 training prompts, 2 a step (one per process), 2 held out (one per process); under FSDP2 each
    # process samples from a float copy gathered from the shards, under DDP from its live replica
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Count to {i}."}) + "\n" for i in range(6)))
    common = online_dpo_args(tiny_hf, data, reward_model)
    ours, theirs = one_and_two_processes(common, tmp_path, "--parallel", parallel)
    assert [m["step"] for m in ours] == [0, 1, 2] and [sorted(m) for m in ours] == [sorted(m) for m in theirs]
    assert all(m["paired"] > 0 for m in ours[1:])  # the steps had pairs to learn from
    for mine, single in zip(ours, theirs):  # the same replies; the sums in another order
        assert mine == pytest.approx(single, rel=1e-3, abs=1e-6), (mine, single)


@pytest.mark.slow  # 18 s: the trainer's SIGKILL tests cover the resume; the torchrun test, the keyed seeds
def test_an_online_dpo_run_killed_with_sigkill_resumes_to_the_same_samples_and_losses(tiny_hf, reward_model,
                                                                                      tmp_path):
    # killed before step 4, after checkpoint step-2: step 3 is done again from the checkpoint and samples
    # the same replies (their seeds are keyed by the step and the prompt), so every logged line repeats
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Count to {i}."}) + "\n" for i in range(6)))
    common = [*online_dpo_args(tiny_hf, data, reward_model), "--batch-size", "2", "--steps", "4",
              "--save-every", "2", "--eval-every", "2"]
    whole = qwen2_cli(*common, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = tmp_path / "killed"
    kill_when_paused("before-step", 3, [*common, "--out", str(killed)], tmp_path / "killed.log")
    assert [m["step"] for m in metrics(killed)] == [0, 1, 2, 3]
    done = qwen2_cli(*common, "--out", str(killed), "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resume: from {killed / 'checkpoints' / 'step-2'} (step 2 of 4)" in done.stderr
    assert metrics(killed) == metrics(tmp_path / "whole")
    assert all(m["paired"] > 0 for m in metrics(killed)[1:])
