"""Run an untrusted Python program (a model's code and its tests) with the host kept out of reach.

Each program runs in a fresh temp directory, in its own session (process group), with a
minimal environment and these limits, which a launcher (this file run as a script) sets on
itself before it execs the program:
- memory (RLIMIT_AS), CPU seconds, file size, open files, core dumps off;
- as root, where the kernel allows: a new network namespace (no interface but a downed
  loopback, so no connection leaves), a new mount namespace in which /tmp, /var/tmp and
  /dev/shm are read-only except the program's own directory, and then the unprivileged user
  `nobody` with a process-count limit (RLIMIT_NPROC binds only non-root users);
- a wall timeout, after which the whole process group is killed.
Output is captured to a file under the file-size limit and read back truncated, so a program
that prints megabytes or never exits costs only its own run.

Not covered: a kernel exploit, CPU and disk contention with the host, and a process that
escapes its process group with setsid() before the timeout (the process-count limit bounds
how many such a program can leave, and they run as `nobody` without network). Without root
the program runs as the calling user with the limits but no namespaces: isolation is then
only as strong as that user's file permissions.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import pwd
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CLONE_NEWNS, CLONE_NEWNET = 0x00020000, 0x40000000
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18
SHARED_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm")
KEEP_ENV = ("PATH", "LANG", "LC_ALL")


@dataclass(frozen=True)
class Limits:
    wall_seconds: float = 10.0
    cpu_seconds: int = 10
    memory_mb: int = 1024
    file_mb: int = 8
    processes: int = 32
    output_chars: int = 4000


DEFAULT_LIMITS = Limits()


@dataclass
class RunResult:
    status: str  # "ok", "failed" (nonzero exit), "timeout", "killed" (by a signal: a limit)
    returncode: int | None
    output: str  # stdout and stderr together, truncated to Limits.output_chars

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _isolate(workdir: str, limits: Limits, drop_to: pwd.struct_passwd | None) -> None:
    """In the child, after fork and before exec: namespaces, limits, then the unprivileged user."""
    if drop_to is not None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWNET | CLONE_NEWNS) == 0:
            libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None)
            for shared in SHARED_WRITABLE:
                path = shared.encode()
                if not os.path.isdir(shared) or libc.mount(path, path, None, MS_BIND | MS_REC, None) != 0:
                    continue
                # the program's own folder stays writable: bind it onto itself before the
                # shared folder above it turns read-only (a remount leaves submounts alone)
                if workdir.startswith(shared + "/"):
                    libc.mount(workdir.encode(), workdir.encode(), None, MS_BIND, None)
                libc.mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY, None)
    memory = limits.memory_mb * 2**20
    for which, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, limits.cpu_seconds),
                         (resource.RLIMIT_FSIZE, limits.file_mb * 2**20), (resource.RLIMIT_NOFILE, 64),
                         (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(which, (value, value))
    if drop_to is not None:
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))
        os.setgroups([])
        os.setgid(drop_to.pw_gid)
        os.setuid(drop_to.pw_uid)


def _unprivileged_user() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        return None


def _world_usable(path: Path) -> bool:
    """Whether any user may execute `path`: the file and every folder above it are o+x."""
    return all(os.stat(p).st_mode & 0o001 for p in [path, *path.parents])


def interpreter(unprivileged: bool) -> str:
    """This Python, or where the unprivileged user cannot reach it (e.g. under /root), the
    system's python3; the programs need only the standard library."""
    own = Path(os.path.realpath(sys.executable))
    if not unprivileged or _world_usable(own):
        return sys.executable
    system = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
    if system is None or not _world_usable(Path(os.path.realpath(system))):
        raise RuntimeError(f"no Python that the user 'nobody' may run: {own} is private and there is no "
                           "system python3; install one, or run as a non-root user")
    return system


def run_program(source: str, limits: Limits = DEFAULT_LIMITS) -> RunResult:
    """Run `source` with `python -I` in a sandbox; see the module docstring for what it guards."""
    drop_to = _unprivileged_user()
    with tempfile.TemporaryDirectory(prefix="qwen2-sandbox-") as workdir, \
            tempfile.TemporaryFile(prefix="qwen2-sandbox-out-") as out:
        program = Path(workdir, "program.py")
        program.write_text(source, encoding="utf-8")
        if drop_to is not None:
            os.chown(workdir, drop_to.pw_uid, drop_to.pw_gid)
            os.chown(program, drop_to.pw_uid, drop_to.pw_gid)
        env = {k: os.environ[k] for k in KEEP_ENV if k in os.environ}
        env.update(HOME=workdir, TMPDIR=workdir, PYTHONDONTWRITEBYTECODE="1")
        # a launcher (this file as a script) isolates itself and then becomes the program, so
        # nothing runs between fork and exec in this possibly threaded process
        command = [interpreter(drop_to is not None), "-I", str(program)]
        spec = json.dumps(dict(workdir=workdir, limits=dataclasses.asdict(limits),
                               user=drop_to.pw_name if drop_to else None, command=command))
        proc = subprocess.Popen([sys.executable, "-I", __file__, spec], cwd=workdir, env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True)
        try:
            returncode = proc.wait(timeout=limits.wall_seconds)
            status = "ok" if returncode == 0 else "failed" if returncode > 0 else "killed"
        except subprocess.TimeoutExpired:
            returncode, status = None, "timeout"
        finally:
            _kill_group(proc)
        out.seek(0)
        output = out.read(limits.output_chars * 4).decode("utf-8", "replace")[: limits.output_chars]
    return RunResult(status, returncode, output)


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill whatever is left of the program's process group (children it forked included)."""
    for _ in range(20):  # a fork bomb may still be forking while the first kill lands
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            break
        time.sleep(0.01)
    proc.wait()


if __name__ == "__main__":
    _spec = json.loads(sys.argv[1])
    _isolate(_spec["workdir"], Limits(**_spec["limits"]), pwd.getpwnam(_spec["user"]) if _spec["user"] else None)
    os.execv(_spec["command"][0], _spec["command"])
