"""Reading documents in and cutting them into token-budgeted chunks that remember where they came from.

Formats: plain text and Markdown (read as UTF-8 text), HTML (tags dropped, blocks kept as
paragraphs, scripts and styles skipped), PDF (the text layer, through pypdf), and a folder of
them (read in sorted order; files of other kinds are skipped). A file that cannot be read, an
encrypted PDF, an empty or binary file, or a folder with nothing readable is an OptionError.
Not covered: scanned PDFs (no text layer; no OCR), Office formats, tables kept as tables.

A document is untrusted input: one yields at most `Limits.chars` characters and a PDF at most
`Limits.pages` pages, and extraction stops as soon as either is passed. HTML goes through lxml's
streaming parser (libxml2, linear in the input; the stdlib html.parser of Python 3.11.7 is
quadratic on an unclosed `<a x` repeated). `read_sources` parses HTML and PDF in a child process
under the rest of the limits (memory, CPU, wall time): see qwen2.agent.isolation.

Chunking packs paragraphs into a token budget; a paragraph over the budget is split at its
sentences, and a sentence over it at its words. Pieces are cut before the space that starts a
word, so their token counts add up to the chunk's. Each chunk keeps its source and character
span, and consecutive chunks of a source share a small overlap; the spans cover every character.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qwen2.errors import OptionError

if TYPE_CHECKING:  # the parsing child imports this module: it needs no tokenizer
    from qwen2.tokenizer import Tokenizer

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst", ".text", ""}
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
PDF_SUFFIXES = {".pdf"}
READABLE = TEXT_SUFFIXES | HTML_SUFFIXES | PDF_SUFFIXES
PARAGRAPH_END = re.compile(r"(?<=\n\n)(?=[^\n])")
SENTENCE_END = re.compile(r"(?<=[.!?。！？;；])(?=\s)|(?<=[。！？])|(?<=\n)(?=[^\n])")
WORD_START = re.compile(r"(?=\s\S)")
# The agent reads up to ~1M tokens (about 4M characters of English, ~2,500 pages): a document may
# give twice that text and four times those pages, so no real document the agent can read is
# refused, while a decompression bomb stops early.
MAX_CHARS = 8 * 2**20
MAX_PAGES = 10_000


@dataclass(frozen=True)
class Limits:
    """What reading one document may cost. `chars` and `pages` bound what extraction yields;
    `memory`, `cpu` and `wall` bound the child process that parses HTML and PDF."""

    chars: int = MAX_CHARS
    pages: int = MAX_PAGES
    memory: int = 2**30  # bytes of address space: pypdf holds the file twice and decodes streams of up to 75 MB
    # CPU seconds: pypdf extracts ~390 plain text pages (~1.3M characters) a second here, so a document
    # at the caps needs ~30 s, and one with heavy fonts a few times that; one page of 400,000 text
    # operators (54 KB of PDF) keeps pypdf busy past 120 s, and is stopped here
    cpu: int = 120
    wall: float = 300.0  # seconds before the child is killed (it runs at a lower priority than the engine)


LIMITS = Limits()


class TooMuchText(OptionError):
    """Extraction passed Limits.chars or Limits.pages; raised as soon as it does."""


@dataclass(frozen=True)
class Source:
    name: str  # the file's path as given (or the upload's name)
    text: str


@dataclass(frozen=True)
class Chunk:
    source: str
    index: int  # position among the chunks of its source
    start: int  # character span within the source's text
    end: int
    text: str
    tokens: int


def read_sources(path: str | Path, limits: Limits = LIMITS) -> list[Source]:
    """The text of a file, or of every readable file in a folder (recursively, sorted by path).
    HTML and PDF are parsed in a child process under `limits` (qwen2.agent.isolation)."""
    from qwen2.agent.isolation import read_bounded  # it imports this module

    path = Path(path)
    if path.is_dir():
        files = [p for p in sorted(path.rglob("*")) if p.is_file() and p.suffix.lower() in READABLE
                 and not any(part.startswith(".") for part in p.relative_to(path).parts)]
        sources = []
        for file in files:
            try:
                sources.append(read_bounded(file, limits=limits))
            except OptionError:
                continue  # one bad file in a folder does not sink the others
        if not sources:
            raise OptionError(f"{path}: the folder holds no readable document (text, Markdown, HTML or a PDF with a "
                              "text layer); add some or point at a file")
        return sources
    if not path.exists():
        raise OptionError(f"{path}: no such file or folder")
    return [read_bounded(path, limits=limits)]


def read_bytes(path: Path, limits: Limits = LIMITS) -> bytes:
    """A local file's bytes, refused unread when even a PDF of it would be over the limits."""
    try:
        size = path.stat().st_size
        # a PDF's text layer is usually a fraction of the file; 64 bytes a character is far beyond any
        if size > 64 * limits.chars:
            raise OptionError(f"{path}: {size:,} bytes is too large a document (the limit is about "
                              f"{limits.chars:,} characters of text); split it")
        return path.read_bytes()
    except OSError as e:
        raise OptionError(f"{path}: cannot read it ({e.strerror})") from None


def kind_of(path: Path, data: bytes) -> str:
    """The parser a document needs ("pdf", "html" or "text"): by its suffix, or its first bytes."""
    suffix = path.suffix.lower()
    if suffix in PDF_SUFFIXES or data.startswith(b"%PDF-"):
        return "pdf"
    head = data[:200].decode("utf-8", errors="ignore").lstrip("\ufeff")
    if suffix in HTML_SUFFIXES or re.match(r"\s*<(!doctype html|html)", head, re.IGNORECASE):
        return "html"
    return "text"


def read_file(path: Path, data: bytes | None = None, limits: Limits = LIMITS) -> Source:
    """One document, parsed in this process; `data` stands for the file's bytes when they came another
    way (an upload). Only `limits.chars` and `limits.pages` apply here."""
    if data is None:
        data = read_bytes(path, limits)
    kind = kind_of(path, data)
    if kind == "pdf":
        text = pdf_text(path, data, limits)
    else:
        text = decode_text(path, data)
        if kind == "html":
            text = html_text(text, limits.chars, path)
    if not text.strip():
        raise OptionError(f"{path}: the document is empty (no text to read)")
    if len(text) > limits.chars:
        raise too_much_text(path, limits.chars)
    return Source(str(path), text)


def too_much_text(path: Path, chars: int) -> TooMuchText:
    return TooMuchText(f"{path}: the document has more than {chars:,} characters of text, the limit (the agent "
                       "reads up to ~1M tokens); split it or give the part that matters")


def decode_text(path: Path, data: bytes) -> str:
    if b"\x00" in data[:8192]:
        raise OptionError(f"{path}: this is a binary file, not a document; give text, Markdown, HTML or PDF")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise OptionError(f"{path}: not UTF-8 text (bad byte at offset {e.start}); convert it to UTF-8 or give "
                          "a PDF or HTML file") from None


def pdf_text(path: Path, data: bytes, limits: Limits = LIMITS) -> str:
    import io

    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    quiet = logging.getLogger("pypdf")
    level, quiet.level = quiet.level, logging.ERROR  # its warnings about a broken file repeat our one line
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise OptionError(f"{path}: the PDF is encrypted with a password; save a decrypted copy and give that")
        pages = _page_texts(path, reader, limits)
    except OptionError:
        raise
    except (PyPdfError, ValueError, KeyError, TypeError, OSError) as e:
        raise OptionError(f"{path}: not a readable PDF ({type(e).__name__}: {str(e)[:120]}); check the file or "
                          "convert it to text") from None
    finally:
        quiet.setLevel(level)
    text = "\n\n".join(p.strip() for p in pages if p.strip())
    if not text:
        raise OptionError(f"{path}: the PDF has no text layer (a scan?); run OCR on it first")
    return text


def _page_texts(path: Path, reader, limits: Limits) -> list[str]:
    """Each page's text, stopping at the first page or text run past the limits."""
    count = len(reader.pages)  # the page tree's /Count: checked again while walking, as it can lie
    if count > limits.pages:
        raise too_many_pages(path, count, limits)
    texts, total = [], 0

    def counted(text: str, *_) -> None:  # called per text run, so one huge page stops part-way too
        nonlocal total
        total += len(text)
        if total > limits.chars:
            raise too_much_text(path, limits.chars)

    for number, page in enumerate(reader.pages, 1):
        if number > limits.pages:
            raise too_many_pages(path, number, limits, walked=True)
        texts.append(page.extract_text(visitor_text=counted) or "")
    return texts


def too_many_pages(path: Path, count: int, limits: Limits, walked: bool = False) -> TooMuchText:
    # a walk stops at the first page over the cap, so it knows a lower bound only
    return TooMuchText(f"{path}: the PDF has {'at least ' if walked else ''}{count:,} pages, "
                       f"over the limit of {limits.pages:,}; split it or give the part that matters")


class _TextOfHTML:
    """An lxml parser target: collects the text as the parser streams it (no tree is built)."""

    BLOCKS = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article", "pre",
              "blockquote", "table", "ul", "ol", "header", "footer", "title"}
    SKIPPED = {"script", "style", "noscript", "template"}

    def __init__(self, max_chars: int, path: Path) -> None:
        self.parts: list[str] = []
        self.skipping = self.chars = 0
        self.max_chars, self.path = max_chars, path

    def start(self, tag: str, attrs: dict) -> None:
        self.skipping += tag in self.SKIPPED
        if tag in self.BLOCKS:
            self.parts.append("\n\n")

    def end(self, tag: str) -> None:
        self.skipping -= tag in self.SKIPPED and self.skipping > 0
        if tag in self.BLOCKS:
            self.parts.append("\n\n")

    def data(self, data: str) -> None:
        if not self.skipping:
            self.chars += len(data)
            if self.chars > self.max_chars:  # raised through lxml: the parse stops here
                raise too_much_text(self.path, self.max_chars)
            self.parts.append(data)

    def close(self) -> str:
        return "".join(self.parts)


def html_text(html: str, max_chars: int = MAX_CHARS, path: Path = Path("document.html")) -> str:
    from lxml import etree

    # lxml over the stdlib html.parser: libxml2 parses in one linear pass, where html.parser (3.11.7
    # measured) rescans an unclosed tag to the end of the input at every `<`: 4x the time for 2x `<a x`
    parser = etree.HTMLParser(target=_TextOfHTML(max_chars, path), no_network=True, encoding="utf-8")
    parser.feed(html.encode("utf-8", errors="replace"))
    text = parser.close()
    paragraphs = (" ".join(p.split()) for p in re.split(r"\n\s*\n", text))
    return "\n\n".join(p for p in paragraphs if p)


class Document:
    """Sources cut into small pieces (sentences, or words of a very long sentence) with token counts,
    from which chunks of any budget are packed without tokenizing again."""

    def __init__(self, sources: list[Source], tokenizer: Tokenizer, max_piece: int = 128):
        self.sources, self.tokenizer = sources, tokenizer
        # per source: (start, end, tokens, starts_paragraph) of each piece
        self.pieces = [list(self._pieces(s.text, max_piece)) for s in sources]
        self.tokens = sum(p[2] for pieces in self.pieces for p in pieces)

    def _pieces(self, text: str, max_piece: int):
        for para in spans(text, 0, len(text), PARAGRAPH_END):
            first = True
            for sentence in spans(text, *para, SENTENCE_END):
                n = len(self.tokenizer.encode(text[sentence[0]:sentence[1]]))
                if n <= max_piece:
                    yield sentence[0], sentence[1], n, first
                else:
                    for word in spans(text, *sentence, WORD_START):
                        yield word[0], word[1], len(self.tokenizer.encode(text[word[0]:word[1]])), first
                        first = False
                first = False

    def chunks(self, budget: int, overlap: int = 0) -> list[Chunk]:
        """Chunks of at most `budget` tokens; each starts with up to `overlap` tokens of the one before."""
        if overlap >= budget // 2:
            raise OptionError(f"the chunk overlap ({overlap}) must be under half the chunk budget ({budget})")
        chunks = []
        for source, pieces in zip(self.sources, self.pieces):
            i, index = 0, 0
            while i < len(pieces):
                j, used = i, 0
                while j < len(pieces) and (j == i or used + pieces[j][2] <= budget):
                    used += pieces[j][2]
                    j += 1
                # close at the last paragraph start in the second half when the next piece would not fit
                if j < len(pieces):
                    starts = [k for k in range(i + 1, j) if pieces[k][3]]
                    if starts and sum(p[2] for p in pieces[i:starts[-1]]) >= budget // 2:
                        j = starts[-1]
                start, end = pieces[i][0], pieces[j - 1][1]
                tokens = sum(p[2] for p in pieces[i:j])
                chunks.append(Chunk(source.name, index, start, end, source.text[start:end], tokens))
                index += 1
                if j >= len(pieces):
                    break
                back, kept = j, 0
                while back - 1 > i and kept + pieces[back - 1][2] <= overlap:
                    back -= 1
                    kept += pieces[back][2]
                i = back
        return chunks

    def front(self, budget: int) -> list[Chunk]:
        """The beginning of each source, within `budget` tokens in all (for summary-type questions)."""
        share = max(budget // len(self.sources), 64)
        out, left = [], budget
        for chunk in self.chunks(min(share, left)):
            if chunk.index == 0 and chunk.tokens <= left:
                out.append(chunk)
                left -= chunk.tokens
        return out


def spans(text: str, start: int, end: int, boundary: re.Pattern) -> list[tuple[int, int]]:
    cuts = [start] + [m.start() for m in boundary.finditer(text, start, end) if start < m.start() < end] + [end]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if a < b]
