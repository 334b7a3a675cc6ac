"""Joining a Ray cluster, or starting one on this machine, for `--ray ADDRESS|local[:N]`.

Ray is how the project outgrows one process without one model outgrowing one device: replicas of
the whole server behind one endpoint (qwen2.server.replicas), eval and data items spread over
engine actors (qwen2.eval.engine_actors), training workers (qwen2.train.ray_launcher).
`ray` is an optional dependency (the `ray` extra); without it every --ray flag says how to get it.

    local        a Ray instance on this machine, as many workers as cores allow
    local:N      the same, N workers
    ADDRESS      join a running cluster (`ray start --head` printed it, e.g. 10.0.0.1:6379, or
                 ray://HOST:10001 for Ray Client); `auto` finds the one this machine belongs to
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from types import ModuleType

from qwen2.errors import OptionError

INSTALL = 'pip install "qwen2[ray]" (Ray with its Serve and Train libraries)'


@dataclass(frozen=True)
class RaySpec:
    address: str | None  # None: start a local instance
    workers: int | None  # local:N's N; None: as many as the cluster's CPUs allow

    @property
    def local(self) -> bool:
        return self.address is None


def parse_ray(value: str) -> RaySpec:
    """--ray's value: `local`, `local:N` or a cluster address, or a one-line OptionError."""
    value = value.strip()
    if value == "local" or value.startswith("local:"):
        count = value.partition(":")[2]
        if count and not (count.isdigit() and int(count) >= 1):
            raise OptionError(f"--ray {value}: the number after local: is how many workers to start, "
                              "a whole number of at least 1 (e.g. local:2)")
        return RaySpec(None, int(count) if count else None)
    if not value or value.startswith("-") or any(c.isspace() for c in value):
        raise OptionError(f"--ray {value!r} is neither local[:N] nor a cluster address (HOST:PORT, "
                          "ray://HOST:PORT or auto)")
    return RaySpec(value, None)


def require_ray() -> ModuleType:
    """The ray module, or one line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise OptionError(f"--ray and --replicas run on Ray, which is not installed: {INSTALL}") from None
    return ray


def connect(spec: RaySpec, num_cpus: int | None = None) -> ModuleType:
    """Start or join the cluster `spec` names (once per process) and return the ray module.
    A local instance gets `num_cpus` CPUs (default: this machine's), no dashboard, quiet logs."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    quiet = dict(logging_level="WARNING", log_to_driver=False)
    if spec.local:  # "local": a new instance, even where `ray start` left one this machine would join
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, **quiet)
        return ray
    _check_reachable(spec.address)
    try:
        ray.init(address=spec.address, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise OptionError(f"cannot join the Ray cluster at {spec.address} ({' '.join(str(e).split())[:300]}); "
                          "is `ray start --head` running there, and are RAY_AUTH_MODE=token and RAY_AUTH_TOKEN "
                          "(`ray get-auth-token` on the head) set here?") from None
    return ray


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A HOST:PORT that nothing answers on is one line now: Ray itself would retry it for minutes."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not (host and port.isdigit()):
        return  # `auto` and the like: Ray finds the address itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise OptionError(f"nothing answers at {address} ({e.strerror or e}); start the head there with "
                          "`ray start --head`, or give the address it printed") from None


def cluster_cpus(ray: ModuleType) -> int:
    """The CPUs the cluster has in all (every node's)."""
    return int(ray.cluster_resources().get("CPU", 1))


def cluster_gpus(ray: ModuleType) -> int:
    return int(ray.cluster_resources().get("GPU", 0))
