"""Files we write and read back: checkpoints, caches, outputs.

Writes: files and folders that are either whole or absent under their final name, even across a kill
or a power cut: written under a temporary name in the same folder, flushed to the disk (fsync),
renamed over the final name (os.replace, atomic on one file system), and the folder flushed too,
so that the rename itself survives a crash. Every checkpoint, cache and output we write goes
through here, so a reader never sees half a file and a crash never leaves an old file truncated.

The temporary names start with a dot and end in ".tmp", so no loader's glob (`*.safetensors`,
`step-*`) mistakes one a kill left behind for a real file.

Reads: `load_plain` opens torch files with weights_only=True, so a file holding anything but
tensors and plain containers (a pickled object whose loading would run code) is refused, never run.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qwen2.errors import WeightsError

# errors a file system gives when it cannot flush a folder (some network and FUSE mounts):
# the rename is still atomic there, only not guaranteed durable, which is all such a mount offers
_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EBADF}


def fsync(path: str | Path) -> None:
    """Flush a file's or a folder's contents and metadata to the disk."""
    path = Path(path)
    if os.name == "nt" and path.is_dir():  # Windows cannot open a folder to flush it
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if not (path.is_dir() and e.errno in _UNSUPPORTED):
            raise
    finally:
        os.close(fd)


def temporary_name(path: str | Path) -> Path:
    """A fresh name beside `path` for writing it aside (unique per process and call)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def publish(tmp: str | Path, dest: str | Path) -> None:
    """Rename `tmp` (a file, or a folder of files) to `dest` once everything in it is on the disk,
    then flush `dest`'s folder so the rename is durable. A folder `dest` must be absent or empty."""
    tmp, dest = Path(tmp), Path(dest)
    if tmp.is_dir():
        for folder, _, files in os.walk(tmp):
            for name in files:
                fsync(Path(folder) / name)
            fsync(folder)
    else:
        fsync(tmp)
    os.replace(tmp, dest)
    fsync(dest.parent)


def write_atomically(path: str | Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp)` to write the file at `tmp`, then publish it as `path`. If `write` fails
    (disk full, an exception, Ctrl-C) the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        write(tmp)
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomically(path: str | Path, text: str) -> None:
    """`path.write_text(text)` (UTF-8), whole or not at all."""
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_folder_atomically(folder: str | Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp)` to fill a new folder `tmp`, then publish it as `folder`, replacing any
    folder of that name. A kill leaves the old folder or the new one, never a mix; only between
    removing the old one and the rename can it leave neither (the caller's previous step remains)."""
    folder = Path(folder)
    tmp = temporary_name(folder)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        publish(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_plain(path: str | Path, fix: str) -> Any:
    """torch.load(path) restricted to tensors, numbers, strings and containers of them. Anything
    else, or a corrupt file, is a WeightsError that says why and ends with `fix` (what to do)."""
    import pickle

    import torch

    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:  # torch names the callable the file wanted to run
            raise WeightsError(f"{path} was not loaded: it holds a Python object ({found[1]}) where a file we write "
                               "holds only tensors and plain values, and loading it could run code. It was not "
                               f"written by qwen2, or was altered since; {fix}") from None
        raise WeightsError(f"{path} is corrupt (not a file torch.save wrote); {fix}") from None
    except (RuntimeError, EOFError, ValueError) as e:  # torch's reader on a truncated or garbled file
        raise WeightsError(f"{path} is corrupt or truncated ({_first_sentence(e)}); {fix}") from None
    except OSError as e:
        raise WeightsError(f"cannot read {path} ({e.strerror or e}); {fix}") from None


def _first_sentence(error: Exception) -> str:
    return str(error).strip().split(". ")[0].rstrip(".") or type(error).__name__
