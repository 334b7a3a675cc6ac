"""Expert parallelism (`--parallel ep`) in two real processes under torchrun (gloo on the CPU): an
MoE model's three experts dealt out unevenly (two and one), each process training on its own
rows, take the steps of one process with the same micro-batches (so the router balance loss,
a per-micro-batch quantity, is the same too): losses, gradient norms after the experts' squares
are summed over processes, and the trained model, whole in the output folder. A run killed after
a checkpoint resumes to the same steps; settings it cannot run are refused before any work."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from qwen2.distributed.expert_parallel import _by_expert, deal
from qwen2.errors import ConfigError
from qwen2.loading import load_model
from tests.distributed.test_data_parallel import TORCHRUN, assert_same_model, needs_torchrun, steps
from tests.distributed.test_tensor_parallel import hf_folder, our_frames
from tests.train.test_align import free_port
from tests.train.test_trainer import ENV, PACKAGE_ROOT, PROBE

SETTINGS = ["--max-len", "64", "--lr", "1e-3", "--no-bf16"]


@pytest.fixture(scope="module")
def moe3(tmp_path_factory, default_tokenizer):
    """Three experts, top-2, a shared expert: process 0 holds experts 0 and 1, process 1 expert 2."""
    return hf_folder(tmp_path_factory, default_tokenizer, "moe3", 1, model_type="qwen2_moe", num_experts=3,
                     num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                     tie_word_embeddings=False)


def sft(model, data, out, *options, processes=1, probe=(), task="sft"):
    """`qwen2 train sft` (or `task`): one process taking two micro-batches of one row a step, or two
    processes under --parallel ep taking one each (`probe`: pause_probe.py's arguments)."""
    start = [str(PROBE), *probe, "--"] if probe else ["-m", "qwen2"]
    common = ["train", task, "--model", str(model), "--data", str(data), "--out", str(out), "--batch-size", "1",
              *SETTINGS, *options]
    if processes == 1:
        command = [sys.executable, *start, *common, "--grad-accum", "2"]
    else:
        command = [str(TORCHRUN), "--nproc-per-node", "2", "--master-port", str(free_port()), *start, *common,
                   "--parallel", "ep"]
    return subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=PACKAGE_ROOT, timeout=300)


def test_experts_are_dealt_in_runs_the_first_processes_one_more():
    assert deal(3, 2) == (range(0, 2), range(2, 3))
    assert deal(60, 4) == tuple(range(15 * r, 15 * (r + 1)) for r in range(4))


def test_rows_laid_out_by_process_are_regrouped_by_expert():
    # process 0 sent 2 rows for expert a and 1 for b; process 1 sent 0 for a and 3 for b
    blocks = torch.tensor([[2, 1], [0, 3]])
    assert _by_expert(blocks).tolist() == [0, 1, 2, 3, 4, 5]
    blocks = torch.tensor([[1, 2], [3, 0]])  # rows 0 | 1 2 from process 0, 3 4 5 | - from process 1
    assert _by_expert(blocks).tolist() == [0, 3, 4, 5, 1, 2]


def test_a_process_reads_only_its_own_experts(moe3, tiny_hf):
    model, _ = load_model(moe3, quant="none", dtype="float32", experts_of=(1, 2))
    for block in model.model.layers:
        assert list(block.mlp.experts) == ["2"] and block.mlp.dispatch.owned == deal(3, 2)
    whole, _ = load_model(moe3, quant="none", dtype="float32")
    assert whole.state_dict().keys() - model.state_dict().keys() == {
        name for name in whole.state_dict() if ".experts.0." in name or ".experts.1." in name}
    with pytest.raises(ConfigError, match="this model has none"):
        load_model(tiny_hf, quant="none", experts_of=(0, 2))


@needs_torchrun
# LoRA: make test-slow (11 s); the resume test below trains adapters, the experts' included
@pytest.mark.parametrize("lora", [(), pytest.param(("--lora-rank", "4"), marks=pytest.mark.slow)],
                         ids=["full", "lora"])
def test_two_processes_holding_different_experts_take_the_steps_of_one(lora, moe3, tiny_chat_file, tmp_path):
    options = ("--steps", "3", "--save-every", "0", *lora)
    alone = sft(moe3, tiny_chat_file, tmp_path / "one", *options)
    assert alone.returncode == 0, alone.stderr[-2000:]
    run = sft(moe3, tiny_chat_file, tmp_path / "two", *options, processes=2)
    assert run.returncode == 0, run.stderr[-2000:]
    ours, theirs = steps(tmp_path / "two"), steps(tmp_path / "one")
    assert [s["target_tokens"] for s in ours] == [s["target_tokens"] for s in theirs]
    for key in ("loss", "grad_norm"):
        assert [s[key] for s in ours] == pytest.approx([s[key] for s in theirs], rel=1e-5), key
    if not lora:  # norms past the clip (1): every process must scale its gradients by the same factor
        assert all(s["grad_norm"] > 1 for s in ours)
    else:  # the experts' adapters, every process's, in the one adapter file
        adapters = [load_file(tmp_path / out / "adapter" / "adapter_model.safetensors") for out in ("two", "one")]
        assert adapters[0].keys() == adapters[1].keys()
        assert any(".experts.2." in name for name in adapters[0])
    assert_same_model(tmp_path / "two", tmp_path / "one")  # every process's experts, gathered whole


@needs_torchrun
def test_a_run_killed_after_a_checkpoint_resumes_to_the_steps_of_one_process(moe3, tiny_chat_file, tmp_path):
    # killed before step 3, after checkpoint step-2: its experts' adapters (from both processes) give
    # step 3's loss, their Adam moments step 4's
    options = ("--steps", "4", "--save-every", "2", "--lora-rank", "4")
    killed = sft(moe3, tiny_chat_file, tmp_path / "two", *options, processes=2, probe=("killed-before-step", "2"))
    assert killed.returncode != 0 and len(steps(tmp_path / "two")) == 2
    resumed = sft(moe3, tiny_chat_file, tmp_path / "two", *options, "--resume", processes=2)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "(step 2 of 4)" in resumed.stderr
    alone = sft(moe3, tiny_chat_file, tmp_path / "one", *options)
    assert alone.returncode == 0, alone.stderr[-2000:]
    ours, theirs = steps(tmp_path / "two"), steps(tmp_path / "one")
    assert [s["step"] for s in ours] == [1, 2, 3, 4]
    for key in ("loss", "grad_norm"):
        assert [s[key] for s in ours] == pytest.approx([s[key] for s in theirs], rel=1e-5), key
    assert_same_model(tmp_path / "two", tmp_path / "one")
    adapter = load_file(tmp_path / "two" / "checkpoints" / "step-4" / "adapter_model.safetensors")
    assert any(".experts.0." in name for name in adapter) and any(".experts.2." in name for name in adapter)


@needs_torchrun
@pytest.mark.slow  # 9 s; the trainer's loop is the one sft runs above
def test_dpo_with_lora_takes_the_steps_of_one_process(moe3, tmp_path):
    # the reference is the policy with its adapters off: its forwards exchange rows too
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Is {i} a number?", "chosen": "Yes.", "rejected": "No way."})
                             + "\n" for i in range(6)))
    options = ("--steps", "3", "--save-every", "0", "--lora-rank", "4", "--heldout", "0.34")
    alone = sft(moe3, pairs, tmp_path / "one", *options, task="dpo")
    assert alone.returncode == 0, alone.stderr[-2000:]
    run = sft(moe3, pairs, tmp_path / "two", *options, processes=2, task="dpo")
    assert run.returncode == 0, run.stderr[-2000:]
    ours, theirs = steps(tmp_path / "two"), steps(tmp_path / "one")
    assert [sorted(s) for s in ours] == [sorted(s) for s in theirs] and len(ours) == 4  # held-out line first
    clock = {"seconds", "elapsed", "rss_mib", "tokens_per_s"}
    for mine, single in zip(ours, theirs):
        mine, single = ({k: v for k, v in m.items() if k not in clock} for m in (mine, single))
        assert mine == pytest.approx(single, rel=1e-5, abs=2e-6), (mine, single)  # 6 decimals logged


@needs_torchrun
@pytest.mark.parametrize("case", ["dense model", "online dpo", "merging optimizer"])
def test_what_expert_parallelism_cannot_run_is_refused_with_the_way_out(case, moe3, tiny_hf, tiny_chat_file,
                                                                        tmp_path):
    if case == "dense model":
        run = sft(tiny_hf, tiny_chat_file, tmp_path, "--steps", "1", processes=2)
        expected = "this model has none; use --parallel ddp or fsdp"
    else:
        task = "online-dpo" if case == "online dpo" else "dpo"
        run = subprocess.run([sys.executable, "-m", "qwen2", "train", task, "--model", str(moe3), "--data",
                              str(tiny_chat_file), "--out", str(tmp_path), "--parallel", "ep",
                              *(["--optimizer", "ondare"] if case == "merging optimizer" else [])],
                             capture_output=True, text=True, env=ENV, cwd=PACKAGE_ROOT, timeout=120)
        expected = "cannot run online DPO" if case == "online dpo" else "use --optimizer adamw"
    assert run.returncode != 0
    assert expected in run.stderr, run.stderr[-2000:]
    assert not our_frames(run.stderr), run.stderr[-2000:]  # torchrun prints its own traceback; ours must not
    assert not (tmp_path / "metrics.jsonl").exists()
