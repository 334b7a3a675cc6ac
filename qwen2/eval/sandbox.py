"""Run an untrusted Python program (a model's code and its tests) with the host kept out of reach.

Every program gets namespaces of its own, as bubblewrap sets them up:
- no network (a network namespace whose only interface, loopback, is down);
- a root filesystem of its own: a read-only tmpfs holding read-only, nosuid binds of the
  system's programs and libraries (/usr, /bin, /lib*, the interpreter's installation, a few
  files of /etc), a fresh /proc, /dev/null-like devices, and a writable, size-capped tmpfs at
  /tmp that is its working folder and HOME; nothing else of the host (no home folders, no
  /run, no host /tmp) is visible, and the old root is detached;
- a PID namespace whose init is the launcher: the program sees only its own processes, and
  when it ends or the wall timeout strikes, the kernel kills every process left (setsid
  grandchildren included);
- an IPC namespace (SysV shared memory and semaphores die with it) and a UTS namespace;
- limits per process: memory (RLIMIT_AS), CPU seconds, file size, open files, no core dumps;
  processes per sample (RLIMIT_NPROC, counted per user and user namespace); no new privileges;
  and where this user may make cgroups (root, or a delegated v2 subtree), a cgroup per sample
  that caps all its processes' memory together and their number.
As root (with CAP_SYS_ADMIN) the namespaces are made directly and the program runs as a
fresh unprivileged uid of its own; otherwise a user namespace makes them, and the program
runs with no capabilities as the calling user mapped inside it. If neither can be set up
(e.g. a container that forbids both), nothing runs: `run_program` answers status "error"
and `isolation()` is None, unless the caller asks for `unsafe=True` (the CLI's
`--unsafe-exec`), which keeps the limits, a process group and a private temp folder, and
gives up everything in the list above but the limits.

A pass is proven, not inferred from the exit status: `run_program(..., prove=True)` hands the
program a random token on stdin, which a wrapper reads before the program's code runs and
prints only after that code has returned; `RunResult.passed` needs the token and status 0, so
`os._exit(0)`, `SystemExit(0)` or an exit hook do not pass.

Not covered: a kernel exploit; CPU, memory bandwidth and disk I/O contention with the host
(without a cgroup, memory is bounded per process, times the process limit); code that reads
the token out of the wrapper's frame on purpose (it defeats a wrong answer's accidental exit,
not an adversary inside the interpreter).
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import cache

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE, MNT_DETACH = 4096, 16384, 1 << 18, 2
PR_SET_NO_NEW_PRIVS, PR_SET_PDEATHSIG = 38, 1
PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
# statvfs flags that a read-only bind must keep: a user namespace may not drop them
KEPT_FLAGS = ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC))
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
ETC_FILES = ("ld.so.cache", "localtime", "passwd", "group", "nsswitch.conf")
DEVICES = ("null", "zero", "full", "random", "urandom")
KEEP_ENV = ("LANG", "LC_ALL")
CGROUP_ROOT = "/sys/fs/cgroup"
SETUP_FAILED = 125  # the launcher's exit status when it could not isolate (the program never ran)
MARK = "qwen2-sandbox:"
LEVELS = {"root": "namespaces (root: net, mount, pid, ipc; a uid of its own)",
          "user": "user namespaces (net, mount, pid, ipc; no capabilities)",
          "unsafe": "none (--unsafe-exec: limits and a process group only; the program can reach the network, "
                    "read and write the caller's files and signal its processes)"}

PROVE = """\
import sys
def _run(token, source):
    sys.stdin.close()
    exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__file__": "program.py"})
    print("\\n" + token, flush=True)
_run(sys.stdin.readline().strip(), open("program.py", encoding="utf-8").read())
"""


@dataclass(frozen=True)
class Limits:
    wall_seconds: float = 10.0
    cpu_seconds: int = 10
    memory_mb: int = 1024
    file_mb: int = 8
    processes: int = 32
    output_chars: int = 4000
    tmpfs_mb: int = 64


DEFAULT_LIMITS = Limits()


@dataclass
class RunResult:
    status: str  # "ok", "failed" (nonzero exit), "timeout", "killed" (a signal: a limit), "error" (not run)
    returncode: int | None
    output: str  # stdout and stderr together, truncated to Limits.output_chars
    proven: bool = False  # the proof token was printed after the program returned (run with prove=True)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def passed(self) -> bool:
        return self.ok and self.proven


def run_program(source: str, limits: Limits = DEFAULT_LIMITS, prove: bool = False,
                unsafe: bool = False) -> RunResult:
    """Run `source` with `python -I` in the strongest sandbox this machine allows (module
    docstring). Never raises: a sandbox that cannot be set up, or cleaned up, is status "error"."""
    mode = _mode(unsafe)
    if mode is None:
        return RunResult("error", None, f"{MARK} {unavailable_reason()}")
    token = secrets.token_hex(16) if prove else ""
    try:
        return _run(mode, source, limits, token)
    except OSError as e:
        return RunResult("error", None, f"{MARK} could not run the program: {e}")


def isolation(unsafe: bool = False) -> str | None:
    """What protects the host here (a line for summaries), or None if model code must not run."""
    mode = _mode(unsafe)
    if mode is None:
        return None
    return LEVELS[mode] + ("; a cgroup per sample caps its memory and processes" if mode != "unsafe" and
                           _cgroups_work() else "")


def unavailable_reason() -> str:
    return (f"cannot isolate model-written code on this machine ({_probe()[1]}); run as root, or allow user "
            "namespaces (sysctl user.max_user_namespaces, kernel.unprivileged_userns_clone, a container's "
            "seccomp profile), or pass --unsafe-exec to run it with limits only, unisolated")


def _mode(unsafe: bool) -> str | None:
    """The isolation this machine gives, else "unsafe" where the caller accepts none, else None."""
    return _probe()[0] or ("unsafe" if unsafe else None)


@cache
def _probe() -> tuple[str | None, str]:
    """The first isolation that runs a trivial program here (namespaces as root, then a user
    namespace), and why the others failed."""
    errors = []
    for mode in (["root"] if os.geteuid() == 0 else []) + ["user"]:
        result = _run(mode, "print('isolated')\n", Limits(wall_seconds=30, cpu_seconds=10), "")
        if result.ok and "isolated" in result.output:
            return mode, ""
        errors.append(f"{mode}: {(result.output.strip().splitlines() or [result.status])[-1]}")
    return None, "; ".join(errors)


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup folder per controller we cap (memory, pids), v2 unified or v1."""
    try:
        lines = open("/proc/self/cgroup").read().splitlines()
    except OSError:
        return {}
    found = {}
    for line in lines:
        _, names, path = line.split(":", 2)
        path = path.rstrip("/")
        if names == "" and os.path.exists(f"{CGROUP_ROOT}/cgroup.controllers"):
            found = dict.fromkeys(("memory", "pids"), f"{CGROUP_ROOT}{path}")
        for name in set(names.split(",")) & {"memory", "pids"}:
            found.setdefault(name, f"{CGROUP_ROOT}/{name}{path}")
    return found


def _make_cgroups(limits: Limits) -> list[str]:
    """New cgroup folders capping the sample's total memory and processes, where this user may
    make them (root, or a delegated subtree); [] otherwise, and the rlimits stand alone."""
    made, name = [], f"qwen2-sandbox-{secrets.token_hex(6)}"
    memory = limits.memory_mb * 2**20
    caps = {"memory": {"memory.max": memory, "memory.limit_in_bytes": memory, "memory.swap.max": 0},
            "pids": {"pids.max": limits.processes + 2}}  # + the launcher and its init
    try:
        for controller, parent in _own_cgroups().items():
            if os.path.exists(f"{parent}/cgroup.subtree_control"):  # v2: children get the controller
                with open(f"{parent}/cgroup.subtree_control", "w") as f:
                    f.write(f"+{controller}")
            folder = f"{parent}/{name}"
            if folder not in made:
                os.mkdir(folder)
                made.append(folder)
            present = [file for file in caps[controller] if os.path.exists(f"{folder}/{file}")]
            if not present:
                raise OSError(f"no {controller} controller in {folder}")
            for file in present:
                with open(f"{folder}/{file}", "w") as f:
                    f.write(str(caps[controller][file]))
    except OSError:
        _remove_cgroups(made)
        return []
    return made


@cache
def _cgroups_work() -> bool:
    made = _make_cgroups(DEFAULT_LIMITS)
    return bool(made) and _remove_cgroups(made)


def _remove_cgroups(folders: list[str]) -> bool:
    """rmdir each folder once its processes are gone (they die with the PID namespace, shortly)."""
    for folder in folders:
        for _ in range(100):
            try:
                os.rmdir(folder)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.01)
        else:
            return False
    return True


def _run(mode: str, source: str, limits: Limits, token: str) -> RunResult:
    spec = dict(mode=mode, limits=asdict(limits), source=source, token=token, interpreter=_interpreter(),
                prefix=os.path.realpath(sys.base_prefix), env={k: os.environ[k] for k in KEEP_ENV if k in os.environ},
                uid=os.getuid(), gid=os.getgid(), sample_uid=200_000 + secrets.randbelow(800_000),
                cgroups=_make_cgroups(limits) if mode != "unsafe" and _cgroups_work() else [])
    # an empty folder: the sandbox's root is mounted over it inside the namespaces (the host's
    # copy stays empty); unsafe mode works in it
    folder = tempfile.mkdtemp(prefix="qwen2-sandbox-")
    with tempfile.TemporaryFile(prefix="qwen2-sandbox-out-") as out:
        proc = subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__), folder], stdin=subprocess.PIPE,
                                stdout=out, stderr=subprocess.STDOUT, env={}, start_new_session=True, close_fds=True)
        try:
            proc.stdin.write(json.dumps(spec).encode())
            proc.stdin.close()
            returncode = proc.wait(timeout=limits.wall_seconds)
        except subprocess.TimeoutExpired:
            returncode = None
        except BrokenPipeError:  # the launcher died before it read its spec
            returncode = proc.wait()
        finally:
            _kill_group(proc)
        result = _result(out, returncode, limits, token)
    shutil.rmtree(folder, ignore_errors=True)
    for leftover in ([] if _remove_cgroups(spec["cgroups"]) else spec["cgroups"]) + [folder] * os.path.exists(folder):
        # what the program left behind cannot be removed: the sample may not count as a pass
        result.status, result.proven = "error", False
        result.output += f"\n{MARK} could not remove {leftover}"
    return result


def _result(out, returncode: int | None, limits: Limits, token: str) -> RunResult:
    out.seek(0)
    head = out.read(limits.output_chars * 4).decode("utf-8", "replace")
    out.seek(max(0, out.seek(0, os.SEEK_END) - 4096))
    tail = out.read().decode("utf-8", "replace").splitlines()
    if returncode is None:
        status = "timeout"
    elif returncode == SETUP_FAILED and head.startswith(MARK):
        status = "error"
    elif 128 < returncode < 128 + signal.NSIG:  # the launcher's way to say the program died of a signal
        status = "killed"
    else:
        status = "ok" if returncode == 0 else "failed"
    output = head.replace(f"\n{token}\n", "") if token else head
    return RunResult(status, returncode, output[: limits.output_chars], bool(token) and token in tail)


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the launcher's process group; the PID namespace takes everything under its init along."""
    for _ in range(20):  # unsafe mode has no PID namespace: a fork bomb may still be forking
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            break
        time.sleep(0.01)
    proc.wait()


def _interpreter() -> str:
    """The base installation's binary behind this Python: a venv's python is a link into it or a copy."""
    own = os.path.realpath(sys.executable)
    base = os.path.join(sys.base_exec_prefix, "bin", f"python{sys.version_info.major}.{sys.version_info.minor}")
    copied = sys.prefix != sys.base_prefix and own.startswith(os.path.realpath(sys.prefix) + os.sep)
    return os.path.realpath(base) if copied and os.path.exists(base) else own


# ---- the launcher: this file run as a script, reading its spec on stdin ----

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = (lambda s: s.encode() if s is not None else None)
    _check(_libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def _bind_read_only(source: str, target: str) -> None:
    """Bind `source` at `target`, read-only and nosuid, keeping the flags the source mount has."""
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()
    _mount(source, target, None, MS_BIND | MS_REC)
    flags = os.statvfs(source).f_flag
    kept = sum(ms for st, ms in KEPT_FLAGS if flags & st)
    _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | kept)


def _build_root(root: str, spec: dict) -> None:
    """The program's filesystem (module docstring), assembled on a tmpfs at `root`."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("sandbox", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for path in SYSTEM_DIRS:
        if os.path.islink(path):
            os.symlink(os.readlink(path), root + path)
        elif os.path.isdir(path):
            _bind_read_only(path, root + path)
    if not any(spec["prefix"] == d or spec["prefix"].startswith(d + "/") for d in SYSTEM_DIRS):
        _bind_read_only(spec["prefix"], root + spec["prefix"])
    for name in ETC_FILES:
        if os.path.isfile(f"/etc/{name}"):
            _bind_read_only(f"/etc/{name}", f"{root}/etc/{name}")
    os.makedirs(root + "/dev")
    _mount("dev", root + "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=0755")
    for name in DEVICES:
        open(f"{root}/dev/{name}", "a").close()
        _mount(f"/dev/{name}", f"{root}/dev/{name}", None, MS_BIND)
    for fd, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{fd}", f"{root}/dev/{name}")
    os.symlink("/proc/self/fd", f"{root}/dev/fd")
    size = f"size={spec['limits']['tmpfs_mb']}m,mode=1777"
    for path in ("/tmp", "/dev/shm"):
        os.makedirs(root + path)
        _mount("sandbox", root + path, "tmpfs", MS_NOSUID | MS_NODEV, size)
    os.makedirs(root + "/proc")
    try:
        _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except OSError:  # a container that masks parts of /proc forbids a new one: go without rather than show the host's
        pass
    with open(root + "/tmp/program.py", "w", encoding="utf-8") as f:
        f.write(spec["source"])
    if spec["token"]:
        with open(root + "/tmp/prove.py", "w", encoding="utf-8") as f:
            f.write(PROVE)
    _mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    os.chdir(root)
    number = PIVOT_ROOT.get(platform.machine())
    if number is not None:  # pivot, then detach the old root: nothing of the host stays reachable
        _check(_libc.syscall(number, b".", b"."), "pivot_root")
        _check(_libc.umount2(b".", MNT_DETACH), "detach the old root")
    else:
        os.chroot(".")
    os.chdir("/tmp")


def _enter_user_namespace(spec: dict) -> None:
    """unshare a user namespace mapping only the caller's ids, to a nonzero uid inside, so that
    exec drops every capability the namespace gave us."""
    inside = spec["uid"] or 65534
    _check(_libc.unshare(CLONE_NEWUSER), "unshare a user namespace")
    for name, line in (("setgroups", "deny"), ("uid_map", f"{inside} {spec['uid']} 1"),
                       ("gid_map", f"{spec['gid'] or 65534} {spec['gid']} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(line)


def _start_program(spec: dict) -> int:
    """Fork the program: limits, no new privileges, the sample's uid as root, then exec Python."""
    limits, token = spec["limits"], spec["token"]
    stdin_read, stdin_write = os.pipe()
    pid = os.fork()
    if pid:
        os.close(stdin_read)
        os.write(stdin_write, (token + "\n").encode())
        os.close(stdin_write)
        return pid
    try:
        os.dup2(stdin_read, 0)
        os.closerange(3, 1 << 16)
        for which, value in ((resource.RLIMIT_AS, limits["memory_mb"] * 2**20),
                             (resource.RLIMIT_CPU, limits["cpu_seconds"]),
                             (resource.RLIMIT_FSIZE, limits["file_mb"] * 2**20), (resource.RLIMIT_NOFILE, 64),
                             (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, limits["processes"])):
            resource.setrlimit(which, (value, value))
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no new privileges")
        if spec["mode"] == "root":
            os.setgroups([])
            os.setgid(spec["sample_uid"])
            os.setuid(spec["sample_uid"])
        env = dict(spec["env"], PATH="/usr/local/bin:/usr/bin:/bin", HOME=os.getcwd(), TMPDIR=os.getcwd(),
                   PYTHONDONTWRITEBYTECODE="1")
        script = "prove.py" if token else "program.py"
        os.execve(spec["interpreter"], [spec["interpreter"], "-I", script], env)
    except BaseException as e:  # noqa: BLE001 - the child must never return into the launcher
        os.write(2, f"{MARK} could not start the program: {e}\n".encode())
    os._exit(SETUP_FAILED)


def _init(spec: dict) -> int:
    """PID 1 of the sandbox: start the program, reap every orphan, end with the program's status;
    the kernel then kills whatever is left in the namespace."""
    program = _start_program(spec)
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return SETUP_FAILED
        if pid == program:
            return _exit_code(status)


def _exit_code(status: int) -> int:
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def _launch(root: str, spec: dict) -> int:
    if spec["mode"] == "unsafe":  # the folder is the working one, removed by the caller
        os.chdir(root)
        for name, text in (("program.py", spec["source"]), ("prove.py", PROVE)):
            with open(name, "w", encoding="utf-8") as f:
                f.write(text)
        return _exit_code(os.waitpid(_start_program(spec), 0)[1])
    for folder in spec["cgroups"]:  # joined before anything forks, so every process of the sample counts
        with open(f"{folder}/cgroup.procs", "w") as f:
            f.write(str(os.getpid()))
    if spec["mode"] == "user":
        _enter_user_namespace(spec)
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS),
           "unshare namespaces")
    pid = os.fork()
    if pid == 0:
        try:
            _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "die with the launcher")
            _build_root(root, spec)
        except OSError as e:
            os.write(2, f"{MARK} could not isolate: {e}\n".encode())
            os._exit(SETUP_FAILED)
        os._exit(_init(spec))
    return _exit_code(os.waitpid(pid, 0)[1])


if __name__ == "__main__":
    _spec = json.loads(sys.stdin.read())
    os.umask(0o022)
    try:
        sys.exit(_launch(sys.argv[1], _spec))
    except OSError as _e:
        os.write(2, f"{MARK} could not isolate: {_e}\n".encode())
        sys.exit(SETUP_FAILED)
