"""`qwen2 train sft ... --ray local:2`: two Ray Train workers (real processes, gloo over loopback) take the
steps of one process with the same global batch, as two torchrun ranks do
(tests/distributed/test_data_parallel.py), online DPO's sampling included; a worker's error, a bad --ray
value and a missing Ray are one line each. A worker's error is checked on the exception Ray Train
raises, not in a second real run: each run costs some 15 s of Ray Train starting up on two cores."""

import json
import sys

import pytest
import torch

from qwen2.cli import main
from qwen2.errors import DataError
from qwen2.loading import load_model
from qwen2.train.ray_launcher import cpus_each, worker_error
from tests.distributed.test_data_parallel import SETTINGS


@pytest.fixture(scope="module")
def ray_local():
    """Ray on two CPUs of this machine, on loopback (the launcher's own `local` takes the node's address);
    the launcher joins it as it joins any running instance."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, logging_level="WARNING",
             log_to_driver=False)
    yield ray
    ray.shutdown()


def sft(tiny_hf, data, out, *extra) -> list[str]:
    return ["train", "sft", "--model", str(tiny_hf), "--data", str(data), "--out", str(out), *SETTINGS, *extra]


def fails_in_one_line(argv: list[str], capfd) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capfd.readouterr().err
    assert exit_.value.code == 1 and "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def steps(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # Ray Train's start-up on two cores: ~25 s, past the default suite's budget
def test_two_ray_workers_take_the_steps_of_one_process_with_the_same_global_batch(ray_local, tiny_hf, tiny_chat_file,
                                                                                   tmp_path, capfd):
    main(sft(tiny_hf, tiny_chat_file, tmp_path / "alone", "--batch-size", "2"))
    main(sft(tiny_hf, tiny_chat_file, tmp_path / "ray", "--batch-size", "1", "--ray", "local:2"))
    printed = json.loads(capfd.readouterr().out.splitlines()[-1])  # as torchrun's rank 0 prints it
    ours, alone = steps(tmp_path / "ray"), steps(tmp_path / "alone")
    assert printed["out"] == str(tmp_path / "ray") and printed["loss"] == ours[-1]["loss"]
    assert [s["target_tokens"] for s in ours] == [s["target_tokens"] for s in alone]
    # the same sums in another order (two gradients all-reduced): float32 rounding, as under torchrun
    assert [s["loss"] for s in ours] == pytest.approx([s["loss"] for s in alone], rel=1e-5)
    model, tokenizer = load_model(tmp_path / "ray", quant="none", dtype="float32")
    reference, _ = load_model(tmp_path / "alone", quant="none", dtype="float32")
    ids = torch.tensor([tokenizer.encode("Name a colour.")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids), atol=1e-3, rtol=1e-3)


@pytest.mark.slow  # Ray Train's start-up, as above
def test_two_ray_workers_sample_and_step_online_dpo_as_one_process_does(ray_local, tiny_hf, tiny_model,
                                                                         default_tokenizer, tmp_path):
    from tests.train.test_online_dpo import online_dpo_args, random_reward_model

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Count to {i}."}) + "\n" for i in range(6)))
    reward_model = random_reward_model(tiny_model, default_tokenizer, tmp_path / "rm")
    common = online_dpo_args(tiny_hf, data, reward_model)
    main([*common, "--out", str(tmp_path / "alone"), "--batch-size", "2"])
    main([*common, "--out", str(tmp_path / "ray"), "--batch-size", "1", "--ray", "local:2"])
    ours, alone = steps(tmp_path / "ray"), steps(tmp_path / "alone")
    assert [s["step"] for s in ours] == [0, 1, 2] and all(s["paired"] > 0 for s in ours[1:])
    timing = {"seconds", "elapsed", "rss_mib"}
    for mine, single in zip(ours, alone):
        assert {k: v for k, v in mine.items() if k not in timing} == \
            pytest.approx({k: v for k, v in single.items() if k not in timing}, rel=1e-3, abs=1e-6)


def test_a_failed_run_ends_with_the_error_a_worker_raised_or_ray_in_brief():
    train = pytest.importorskip("ray.train")
    waiting = RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer")
    error = train.WorkerGroupError("...", {0: waiting, 1: DataError("no such data file or folder: x.jsonl")})
    assert str(worker_error(error)) == "no such data file or folder: x.jsonl"  # what torchrun's rank 1 prints
    line = str(worker_error(train.WorkerGroupError("...", {0: waiting})))
    assert line.startswith("--ray: training worker 0 failed: RuntimeError: [../gloo/transport/tcp/pair.cc:534] "
                           "Connection closed by peer (Ray's logs:")


def test_a_bad_ray_value_is_refused_in_one_line(tiny_hf, tiny_chat_file, tmp_path, capfd):
    line = fails_in_one_line(sft(tiny_hf, tiny_chat_file, tmp_path, "--ray", "local:0"), capfd)
    assert line.startswith("qwen2: error: --ray local:0: the number after local: is how many workers")


def test_without_ray_installed_it_says_how_to_get_it(tiny_hf, tiny_chat_file, tmp_path, capfd, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    line = fails_in_one_line(sft(tiny_hf, tiny_chat_file, tmp_path, "--ray", "local:2"), capfd)
    assert line.startswith("qwen2: error: --ray and --replicas run on Ray, which is not installed: pip install")


def test_each_worker_asks_for_no_more_cpus_than_lets_all_of_them_be_placed():
    assert cpus_each([{"CPU": 2.0}], 2, use_gpu=False) == 1
    assert cpus_each([{"CPU": 8.0}, {"CPU": 8.0}], 3, use_gpu=False) == 4  # at 16/3 each a node holds one, two in all
    assert cpus_each([{"CPU": 16.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 3.0}], 4, use_gpu=True) == pytest.approx(8 / 3)
