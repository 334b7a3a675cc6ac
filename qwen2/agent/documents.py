"""Reading documents in and cutting them into token-budgeted chunks that remember where they came from.

Formats: plain text and Markdown (read as UTF-8 text), HTML (tags dropped, blocks kept as
paragraphs, scripts and styles skipped), PDF (the text layer, through pypdf), and a folder of
them (read in sorted order; files of other kinds are skipped). A file that cannot be read, an
encrypted PDF, an empty or binary file, or a folder with nothing readable is an OptionError.
Not covered: scanned PDFs (no text layer; no OCR), Office formats, tables kept as tables.

Chunking packs paragraphs into a token budget; a paragraph over the budget is split at its
sentences, and a sentence over it at its words. Pieces are cut before the space that starts a
word, so their token counts add up to the chunk's. Each chunk keeps its source and character
span, and consecutive chunks of a source share a small overlap; the spans cover every character.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from qwen2.errors import OptionError
from qwen2.tokenizer import Tokenizer

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst", ".text", ""}
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
PDF_SUFFIXES = {".pdf"}
READABLE = TEXT_SUFFIXES | HTML_SUFFIXES | PDF_SUFFIXES
PARAGRAPH_END = re.compile(r"(?<=\n\n)(?=[^\n])")
SENTENCE_END = re.compile(r"(?<=[.!?。！？;；])(?=\s)|(?<=[。！？])|(?<=\n)(?=[^\n])")
WORD_START = re.compile(r"(?=\s\S)")


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


def read_sources(path: str | Path) -> list[Source]:
    """The text of a file, or of every readable file in a folder (recursively, sorted by path)."""
    path = Path(path)
    if path.is_dir():
        files = [p for p in sorted(path.rglob("*")) if p.is_file() and p.suffix.lower() in READABLE
                 and not any(part.startswith(".") for part in p.relative_to(path).parts)]
        sources = []
        for file in files:
            try:
                sources.append(read_file(file))
            except OptionError:
                continue  # one bad file in a folder does not sink the others
        if not sources:
            raise OptionError(f"{path}: the folder holds no readable document (text, Markdown, HTML or a PDF with a "
                              "text layer); add some or point at a file")
        return sources
    if not path.exists():
        raise OptionError(f"{path}: no such file or folder")
    return [read_file(path)]


def read_file(path: Path, data: bytes | None = None) -> Source:
    """One document; `data` stands for the file's bytes when they came another way (an upload)."""
    if data is None:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise OptionError(f"{path}: cannot read it ({e.strerror})") from None
    suffix = path.suffix.lower()
    if suffix in PDF_SUFFIXES or data.startswith(b"%PDF-"):
        text = pdf_text(path, data)
    else:
        text = decode_text(path, data)
        if suffix in HTML_SUFFIXES or re.match(r"\s*<(!doctype html|html)", text[:200], re.IGNORECASE):
            text = html_text(text)
    if not text.strip():
        raise OptionError(f"{path}: the document is empty (no text to read)")
    return Source(str(path), text)


def decode_text(path: Path, data: bytes) -> str:
    if b"\x00" in data[:8192]:
        raise OptionError(f"{path}: this is a binary file, not a document; give text, Markdown, HTML or PDF")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise OptionError(f"{path}: not UTF-8 text (bad byte at offset {e.start}); convert it to UTF-8 or give "
                          "a PDF or HTML file") from None


def pdf_text(path: Path, data: bytes) -> str:
    import io

    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    quiet = logging.getLogger("pypdf")
    level, quiet.level = quiet.level, logging.ERROR  # its warnings about a broken file repeat our one line
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise OptionError(f"{path}: the PDF is encrypted with a password; save a decrypted copy and give that")
        pages = [page.extract_text() or "" for page in reader.pages]
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


class _TextOfHTML(HTMLParser):
    BLOCKS = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article", "pre",
              "blockquote", "table", "ul", "ol", "header", "footer", "title"}
    SKIPPED = {"script", "style", "noscript", "template"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.skipping += tag in self.SKIPPED
        if tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag: str) -> None:
        self.skipping -= tag in self.SKIPPED and self.skipping > 0
        if tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.parts.append(data)


def html_text(html: str) -> str:
    parser = _TextOfHTML()
    parser.feed(html)
    parser.close()
    paragraphs = (" ".join(p.split()) for p in re.split(r"\n\s*\n", "".join(parser.parts)))
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
