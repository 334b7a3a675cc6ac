"""Parsing an untrusted document in a child process that cannot take the machine down with it.

HTML and PDF parsers are large and run on attacker-chosen bytes: a few KiB of PDF can expand to
gigabytes, a crafted file can make a parser spin. So `read_bounded` hands HTML and PDF to a fresh
child (`python -m qwen2.agent.isolation`), which caps its own address space (RLIMIT_AS) and CPU
time (RLIMIT_CPU), lowers its priority below the engine's, and is killed at a wall deadline. The
child also applies the text and page caps (documents.Limits) while it extracts. Its answer comes
back as JSON, never pickle: a child subverted by a parser bug must not run code in the parent.
Plain text needs no parser (a UTF-8 decode is linear), so it is read in-process.

`read_bounded` blocks (the CLI); `read_upload` is the same for the server's event loop, and
kills the child when the request is cancelled (client gone, timeout).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import qwen2
from qwen2.agent.documents import LIMITS, Limits, Source, kind_of, read_bytes, read_file
from qwen2.errors import OptionError

ERROR_TAIL = 2000  # bytes of the child's stderr kept to tell a memory failure from a crash


def read_bounded(path: Path, data: bytes | None = None, limits: Limits = LIMITS) -> Source:
    """One document; HTML and PDF are parsed in a child process under `limits`."""
    if data is None:
        data = read_bytes(path, limits)
    if kind_of(path, data) == "text":
        return read_file(path, data, limits)
    child = subprocess.Popen(_command(path, limits), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=_environment())
    try:
        out, err = child.communicate(data, timeout=limits.wall)
        timed_out = False
    except subprocess.TimeoutExpired:
        child.kill()
        out, err = child.communicate()
        timed_out = True
    except BaseException:  # KeyboardInterrupt: the child must not outlive us
        child.kill()
        child.wait()
        raise
    return _outcome(path, limits, child.returncode, out, err, timed_out)


async def read_upload(name: str, data: bytes, limits: Limits = LIMITS) -> Source:
    """`read_bounded` for an uploaded document, without blocking the event loop; cancelling the
    awaiting task kills the child at once."""
    path = Path(name)
    if kind_of(path, data) == "text":
        return read_file(path, data, limits)
    child = await asyncio.create_subprocess_exec(*_command(path, limits), stdin=subprocess.PIPE,
                                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_environment())
    try:
        out, err = await asyncio.wait_for(child.communicate(data), limits.wall)
        timed_out = False
    except asyncio.TimeoutError:  # TimeoutError itself only from Python 3.11
        out, err, timed_out = b"", b"", True
    finally:
        if child.returncode is None:  # timed out, or the request was cancelled
            child.kill()
            await child.wait()
    return _outcome(path, limits, child.returncode, out, err, timed_out)


def _command(path: Path, limits: Limits) -> list[str]:
    # -B: the child writes no bytecode files; -I is not used, so the checkout being run is found via PYTHONPATH
    return [sys.executable, "-B", "-m", "qwen2.agent.isolation", str(path), json.dumps(asdict(limits))]


def _environment() -> dict[str, str]:
    # the child must import the same qwen2 as the parent (a checkout or a worktree, not another install)
    root = str(Path(qwen2.__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH")
    return os.environ | {"PYTHONPATH": root + (os.pathsep + path if path else "")}


def _outcome(path: Path, limits: Limits, code: int | None, out: bytes, err: bytes, timed_out: bool) -> Source:
    """The child's text, or one OptionError line saying which limit it ran into."""
    if timed_out:
        raise OptionError(f"{path}: parsing took longer than {limits.wall:g} s and was stopped; the document is "
                          "too complex (or malicious)")
    if code in (-signal.SIGXCPU, -signal.SIGKILL):  # RLIMIT_CPU: SIGXCPU at the soft limit, SIGKILL at the hard
        raise OptionError(f"{path}: parsing used more than {limits.cpu} s of CPU and was stopped; the document is "
                          "too complex (or malicious)")
    try:
        answer = json.loads(out) if code == 0 else {}
    except ValueError:
        answer = {}
    if "text" in answer:
        return Source(str(path), answer["text"])
    if "error" in answer:
        raise OptionError(answer["error"])
    if answer.get("limit") == "memory" or b"MemoryError" in err[-ERROR_TAIL:]:
        raise OptionError(f"{path}: parsing needed more than {limits.memory / 2**20:,.0f} MiB of memory and was "
                          "stopped; the document is too large (or malicious)")
    raise OptionError(f"{path}: the parser failed (exit status {code}); check the file or convert it to text")


def _confine(limits: Limits) -> None:
    """The child's own limits, set before it reads a byte of the document."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (limits.memory, limits.memory))
    # SIGXCPU at the soft limit ends the process; the hard limit (SIGKILL) is a backstop
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu, limits.cpu + 5))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # SIGXCPU's default action would dump core
    os.nice(10)  # the engine's decoding comes first on a shared CPU


def main(argv: list[str]) -> int:
    """The child: argv is the document's name and the limits as JSON; its bytes come on stdin."""
    name, limits = Path(argv[0]), Limits(**json.loads(argv[1]))
    _confine(limits)
    data = sys.stdin.buffer.read()
    try:
        answer = {"text": read_file(name, data, limits).text}
    except OptionError as e:
        answer = {"error": str(e)}
    except MemoryError:
        answer = {"limit": "memory"}
    except RecursionError:
        answer = {"error": f"{name}: the document is nested too deeply to parse"}
    # lone surrogates (a broken PDF font map) cannot cross as UTF-8: they become U+FFFD
    sys.stdout.buffer.write(json.dumps(answer, ensure_ascii=False).encode(errors="replace"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
