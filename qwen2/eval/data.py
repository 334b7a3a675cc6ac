"""Real long prose for the long-context evals: the calibration texts shipped in the exllamav3 wheel.

The wheel (MIT; Wikipedia text CC BY-SA, C4 ODC-BY) is fetched like every payload we take
from PyPI (qwen2.pypi: downloaded, never installed or run), one text member at a time, each
checked against a pinned sha256. Texts: wiki (2.09 MB of English Wikipedia in `<doc ...>`
blocks), c4, code, technical, multilingual, tiny (TinyStories).
"""

from __future__ import annotations

import re
from pathlib import Path

from qwen2.errors import OptionError
from qwen2.pypi import Part, Payload, payload_path

PACKAGE, VERSION = "exllamav3", "1.6.5"
MEMBER_DIR = "exllamav3/conversion/standard_cal_data/"
# name: (sha256, bytes) of `{name}.utf8` in the wheel
TEXTS = {
    "wiki": ("d53fe0aeadf3355eb5d32b48bf8691575244c31caccae88ed46be8e1b40209c7", 2_093_275),
    "c4": ("2daf1ef16e02dbd337f86296acd4c3f2eb703800ad21fd1f48b40280c699cd41", 1_338_229),
    "code": ("12a80d96af7e16b3ecbf2e6899a9c70aee2f4e0003b581979fe6876944e2d891", 1_357_117),
    "technical": ("7cac2a0ddd7bc4db19e52e3b12ced3812514059f1f11bfc427b7849e0077a2ee", 350_054),
    "multilingual": ("68182e06506ead0d2676673fdee4bbe6564ccb06cee3b8373b7e4824297ea91e", 293_500),
    "tiny": ("51449c33b579f8b12e776dcbfa58ef47bab69f6ab7f44e972b7d98c4cfcac7fd", 261_689),
}
_DOC = re.compile(r"<doc [^>]*>\n?(.*?)</doc>", re.DOTALL)


def text_path(name: str = "wiki") -> Path:
    """The cached `{name}.utf8`, fetched on first use."""
    if name not in TEXTS:
        raise OptionError(f"unknown text {name!r}; choose one of {', '.join(TEXTS)}")
    sha256, size = TEXTS[name]
    payload = Payload(f"{name}.utf8", (Part(PACKAGE, VERSION, f"{MEMBER_DIR}{name}.utf8"),), sha256, size)
    return payload_path(payload, f"data/{PACKAGE}-{VERSION}", progress=False)


def load_text(name: str = "wiki") -> str:
    return text_path(name).read_text(encoding="utf-8")


def wiki_documents() -> list[str]:
    """The Wikipedia articles, one string each (title line, blank line, body), tags removed."""
    return [doc.strip() for doc in _DOC.findall(load_text("wiki"))]


def haystack_text() -> str:
    """All Wikipedia articles joined by blank lines (about 470K tokens): the NIAH haystack."""
    return "\n\n".join(wiki_documents())
