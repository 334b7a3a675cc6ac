"""The sandbox that runs model-written code: each escape attempt is stopped and the host is unharmed."""

import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from qwen2.eval.sandbox import Limits, run_program

QUICK = Limits(wall_seconds=5, cpu_seconds=3, memory_mb=512, processes=16)
AS_ROOT = os.geteuid() == 0


def test_a_correct_program_passes_and_its_output_is_kept():
    result = run_program("print('hello from the sandbox')\n", QUICK)
    assert result.ok and "hello from the sandbox" in result.output


def test_a_failing_assertion_is_a_failure_with_its_traceback():
    result = run_program("assert 1 + 1 == 3, 'arithmetic'\n", QUICK)
    assert result.status == "failed" and "AssertionError: arithmetic" in result.output


def test_an_endless_loop_is_stopped_by_the_wall_timeout():
    start = time.monotonic()
    result = run_program("while True:\n    pass\n", Limits(wall_seconds=1.5, cpu_seconds=30))
    assert result.status == "timeout" and time.monotonic() - start < 10


def test_a_sleeping_program_is_stopped_by_the_wall_timeout():
    result = run_program("import time\ntime.sleep(60)\n", Limits(wall_seconds=1))
    assert result.status == "timeout"


def test_a_4gb_allocation_fails_inside_the_sandbox():
    result = run_program("x = bytearray(4 * 1024**3)\nprint('allocated')\n", QUICK)
    assert not result.ok and "MemoryError" in result.output and "allocated" not in result.output


def test_writing_outside_the_temp_dir_is_refused():
    targets = [Path.cwd() / f"sandbox-escape-{uuid.uuid4().hex}", Path("/tmp") / f"sandbox-escape-{uuid.uuid4().hex}"]
    program = "".join(f"open({str(t)!r}, 'w').write('escaped')\n" for t in targets[:1]) + "print('wrote')\n"
    result = run_program(program, QUICK)
    assert not result.ok and "wrote" not in result.output and not targets[0].exists()
    if not AS_ROOT:
        pytest.skip("not root: /tmp stays writable to the sandbox (the module docstring says so)")
    result = run_program(f"open({str(targets[1])!r}, 'w').write('escaped')\nprint('wrote')\n", QUICK)
    assert not result.ok and "Read-only file system" in result.output and not targets[1].exists()


def test_its_own_temp_dir_is_writable():
    result = run_program("open('scratch.txt', 'w').write('x' * 100)\nprint(open('scratch.txt').read()[:3])\n", QUICK)
    assert result.ok and "xxx" in result.output


def test_a_socket_connection_fails(tmp_path):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    try:
        result = run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                             "print('connected')\n", QUICK)
    finally:
        server.close()
    assert not result.ok and "connected" not in result.output
    if AS_ROOT:  # its own network namespace: even loopback is down
        assert "Network is unreachable" in result.output or "Connection refused" in result.output


def test_a_fork_bomb_is_contained_and_the_host_can_still_fork():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    result = run_program(bomb, Limits(wall_seconds=2, cpu_seconds=5, processes=16))
    assert not result.ok
    assert subprocess.run(["true"]).returncode == 0
    if AS_ROOT:  # nothing left running as the sandbox user
        left = subprocess.run(["pgrep", "-u", "nobody", "-f", "program.py"], capture_output=True, text=True)
        assert left.stdout.strip() == ""


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
