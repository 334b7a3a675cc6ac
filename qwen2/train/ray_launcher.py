"""`qwen2 train TASK ... --ray ADDRESS|local[:N]`: the run torchrun would make, on N Ray Train workers.

Why Ray as well as torchrun: one Ray cluster then serves, evaluates, generates data and trains, and Ray
places the workers on its nodes, where torchrun needs a command typed on each node. Ray Train's
TorchTrainer starts torch.distributed in every worker (gloo on CPUs, NCCL on GPUs) and sets RANK,
WORLD_SIZE and LOCAL_RANK as torchrun does, so each worker runs the same code as a torchrun rank (the
trainer, DDP or FSDP2 from --parallel) and rank 0 writes the output folder. This process checks the
options, starts the workers, and prints what rank 0 returns as torchrun's rank 0 would; a failed
worker is one line, the error it raised.

Across nodes --out, and --data and --model where they are paths, must be on storage every node sees
under the same path, and qwen2 installed on every node:

    ray start --head --port 6379                     (on one node)
    ray start --address HEAD:6379                    (on each of the others)
    qwen2 train sft --data ... --out /shared/run --ray auto
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING

from qwen2.errors import OptionError, Qwen2Error

if TYPE_CHECKING:
    from qwen2.train.config import TrainConfig

HELP = ("train on N Ray Train workers instead of torchrun's processes: local (this machine), local:N, or a "
        "running cluster's address (HOST:PORT, ray://HOST:PORT, auto); N defaults to a worker per free GPU "
        "(unless --device cpu), else per free CPU, and each worker takes --batch-size rows per micro-batch. "
        "On several nodes --out (and --data, --model as paths) must be shared storage, the same path on "
        "every node, and qwen2 installed on each")


def launch(value: str, config: TrainConfig, train: Callable[[TrainConfig], dict | None]) -> dict:
    """Run `train(config)` on the workers `--ray value` asks for; rank 0's result."""
    from qwen2.distributed.ray_cluster import connect, parse_ray  # here: qwen2.distributed imports torch

    spec = parse_ray(value)
    config.check()  # a mistake in the options is one line before any worker starts
    ray = connect(spec)
    workers, use_gpu, cpus = _placement(ray, spec.workers, config.parallel.device)
    from ray.train import RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    where = f"{cpus:g} CPU{'' if cpus == 1 else 's'}" + (" and a GPU" if use_gpu else "")
    print(f"training on {workers} Ray Train workers, {where} each; each step's metrics go to "
          f"{os.path.join(config.out, 'metrics.jsonl')}", file=sys.stderr)
    # a worker picks its own GPU (LOCAL_RANK) or stays off the node's GPUs it was not given
    worker_config = copy.deepcopy(config)
    worker_config.parallel.device, worker_config.progress = None if use_gpu else "cpu", False
    job = {"train": train, "cwd": os.getcwd(), "config": worker_config}
    with tempfile.TemporaryDirectory(prefix="qwen2-ray-train-") as storage:  # Ray's own files, not the user's
        trainer = TorchTrainer(_worker, train_loop_config=job, run_config=RunConfig(storage_path=storage),
                               scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                                            resources_per_worker={"CPU": cpus}))
        try:
            return trainer.fit().return_value
        except TrainingFailedError as e:
            raise worker_error(e) from e


def _placement(ray, asked: int | None, device: str | None) -> tuple[int, bool, float]:
    """(workers, whether each gets a GPU, CPUs each): a GPU each where the run may use CUDA and the cluster
    has GPUs, else as many workers as free CPUs; counts Ray could never place are refused now, not waited on."""
    if device not in (None, "cpu") and not device.startswith("cuda"):
        raise OptionError(f"--ray trains on cpu or cuda, not --device {device}")
    free = ray.available_resources()
    free_gpus, free_cpus = int(free.get("GPU", 0)), free.get("CPU", 0)
    use_gpu = device != "cpu" and int(ray.cluster_resources().get("GPU", 0)) > 0
    if device and device.startswith("cuda") and not use_gpu:
        raise OptionError(f"--device {device}, but the Ray cluster has no GPUs (--device cpu, or another cluster)")
    if use_gpu and not 0 < (asked or free_gpus) <= free_gpus:
        raise OptionError(f"--ray: each worker needs a GPU and the Ray cluster has {free_gpus} free"
                          + (f" for {asked} workers" if asked else "") + "; ask for fewer (local:N) or train on "
                          "the CPUs (--device cpu)")
    if free_cpus <= 0:
        raise OptionError("--ray: the Ray cluster has no free CPUs (other work holds them all)")
    workers = asked or (free_gpus if use_gpu else max(1, int(free_cpus)))
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    return workers, use_gpu, min(free_cpus / workers, cpus_each(nodes, workers, use_gpu))


def cpus_each(nodes: list[dict], workers: int, use_gpu: bool) -> float:
    """The most CPUs each worker can ask for with every one placed, Ray putting a worker on one node (and a
    GPU worker where a GPU is): three workers on two 8-CPU nodes get 4 each, not 16/3."""
    room = [(node.get("CPU", 0), int(node.get("GPU", 0)) if use_gpu else workers) for node in nodes]

    def placed(cpus: float) -> int:
        return sum(min(slots, int(cpu / cpus + 1e-9)) for cpu, slots in room)

    return max((cpu / k for cpu, _ in room for k in range(1, workers + 1) if cpu and placed(cpu / k) >= workers),
               default=0.0)


def _worker(job: dict) -> dict | None:
    """One rank, in the driver's working folder: Ray starts workers in its own, and relative paths are the user's."""
    if os.path.isdir(job["cwd"]):
        os.chdir(job["cwd"])
    return job["train"](job["config"])


def worker_error(error: Exception) -> Qwen2Error:
    """The error a failed run ends with: a worker's own (a bad data file is the line torchrun's rank would
    print; the ranks it left waiting fail after it, with less to say), else what Ray says in brief."""
    failures = sorted(getattr(error, "worker_failures", {}).items())
    ours = [f for _, f in failures if isinstance(f, Qwen2Error)]
    if ours:
        return ours[0]
    who, failure = (f"training worker {failures[0][0]}", failures[0][1]) if failures else \
        ("Ray Train", getattr(error, "controller_failure", error))
    said = " ".join(str(failure).split())[:300]
    return OptionError(f"--ray: {who} failed: {type(failure).__name__}: {said} (Ray's logs: "
                       "/tmp/ray/session_latest/logs on each node)")
