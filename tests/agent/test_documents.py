"""Reading documents and cutting them into chunks: every character kept, budgets respected, bad input refused."""

import zipfile
from pathlib import Path

import pytest

from qwen2.agent.documents import Document, Limits, Source, TooMuchText, html_text, read_file, read_sources
from qwen2.errors import OptionError
from tests.agent import bombs

LONG_SENTENCE = "word " * 700  # one sentence far over any chunk budget


def prose() -> str:
    from qwen2.eval.data import wiki_documents

    return "\n\n".join(wiki_documents()[:6])


@pytest.mark.parametrize("budget, overlap", [(500, 32), (1000, 32), (120, 0)])
def test_chunks_cover_every_character_and_respect_the_budget(default_tokenizer, budget, overlap):
    text = prose()[:60000] + "\n\n" + LONG_SENTENCE + "\n\n中文段落。这是第二句话！" * 40
    doc = Document([Source("a.txt", text)], default_tokenizer)
    chunks = doc.chunks(budget, overlap)
    assert chunks[0].start == 0 and chunks[-1].end == len(text)
    for before, after in zip(chunks, chunks[1:]):
        assert after.start <= before.end  # no gap: the spans cover the text
        assert after.start >= before.start
    for c in chunks:
        assert c.text == text[c.start:c.end]
        assert len(default_tokenizer.encode(c.text)) <= budget
        assert c.tokens <= budget
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert sum(c.end - c.start for c in chunks) >= len(text)
    if overlap:
        assert any(after.start < before.end for before, after in zip(chunks, chunks[1:]))


def test_chunks_close_at_paragraph_ends_when_they_can(default_tokenizer):
    paragraphs = [f"Paragraph {i} says something about topic {i}. " * 6 for i in range(30)]
    text = "\n\n".join(paragraphs)
    chunks = Document([Source("p.md", text)], default_tokenizer).chunks(300)
    assert all(c.text.endswith("\n\n") or c.end == len(text) for c in chunks)


def test_a_folder_keeps_each_file_as_its_own_source(default_tokenizer, tmp_path):
    (tmp_path / "b.md").write_text("# Second\n\nThe heron nests by the river.")
    (tmp_path / "a.txt").write_text("The first file talks about pumpkins.")
    (tmp_path / "page.html").write_text("<html><head><style>p {}</style><script>var x;</script></head>"
                                        "<body><h1>Title</h1><p>An &amp; entity.</p><p>Two</p></body></html>")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    sources = read_sources(tmp_path)
    assert [s.name.rsplit("/", 1)[-1] for s in sources] == ["a.txt", "b.md", "page.html"]
    assert sources[2].text == "Title\n\nAn & entity.\n\nTwo"
    chunks = Document(sources, default_tokenizer).chunks(100)
    assert {c.source for c in chunks} == {s.name for s in sources}


def test_html_drops_tags_scripts_and_styles():
    assert html_text("<div>one<br>two<script>alert(1)</script></div><style>x</style>") == "one\n\ntwo"


def write_pdf(path, text: str, password: str | None = None) -> None:
    from pypdf import PdfWriter
    from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

    writer = PdfWriter()
    page = writer.add_blank_page(612, 792)
    font = DictionaryObject({NameObject("/Type"): NameObject("/Font"), NameObject("/Subtype"): NameObject("/Type1"),
                             NameObject("/BaseFont"): NameObject("/Helvetica")})
    page[NameObject("/Resources")] = DictionaryObject({NameObject("/Font"): DictionaryObject(
        {NameObject("/F1"): writer._add_object(font)})})
    stream = DecodedStreamObject()
    stream.set_data(f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode())
    page[NameObject("/Contents")] = writer._add_object(stream)
    if password:
        writer.encrypt(password)
    with open(path, "wb") as f:
        writer.write(f)


def test_a_pdf_gives_its_text_layer(tmp_path):
    write_pdf(tmp_path / "doc.pdf", "The lighthouse keeper counts 42 gulls.")
    assert "42 gulls" in read_file(tmp_path / "doc.pdf").text


def test_bad_inputs_each_get_one_clear_line(tmp_path):
    write_pdf(tmp_path / "locked.pdf", "secret", password="hunter2")
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.7\n garbage that is no pdf")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 8)
    with zipfile.ZipFile(tmp_path / "archive.txt", "w") as z:  # binary under a text name
        z.writestr("x", "y" * 100)
    empty_folder = tmp_path / "nothing"
    empty_folder.mkdir()
    (empty_folder / "empty.md").write_text("")
    expected = {
        "locked.pdf": "encrypted with a password", "broken.pdf": "not a readable PDF", "empty.txt": "is empty",
        "blob.bin": "binary file", "archive.txt": "binary file", "nothing": "no readable document",
        "missing.txt": "no such file",
    }
    for name, words in expected.items():
        with pytest.raises(OptionError) as e:
            read_sources(tmp_path / name)
        message = str(e.value)
        assert words in message and name in message and "\n" not in message


@pytest.fixture
def pages_read(monkeypatch) -> list[int]:
    """Counts the pages pypdf extracts."""
    from pypdf import PageObject

    calls, extract = [], PageObject.extract_text
    monkeypatch.setattr(PageObject, "extract_text", lambda page, *a, **k: calls.append(1) or extract(page, *a, **k))
    return calls


def test_pdf_extraction_stops_at_the_page_that_passes_the_text_cap(pages_read):
    with pytest.raises(TooMuchText, match="more than 1,000 characters"):
        read_file(Path("t.pdf"), bombs.text_pdf(["x" * 100] * 50), Limits(chars=1000))
    assert len(pages_read) == 11  # ten pages make 1,000 characters; the eleventh passes the cap and ends it


def test_a_pdf_over_the_page_cap_is_refused_before_any_page_is_read(pages_read):
    with pytest.raises(TooMuchText) as e:
        read_file(Path("long.pdf"), bombs.many_pages(3000), Limits(pages=1000))
    assert "long.pdf: the PDF has 3,000 pages, over the limit of 1,000" in str(e.value)
    assert pages_read == []


def test_html_extraction_stops_at_the_text_cap():
    assert len(html_text("<p>" + "word " * 200, max_chars=1000)) == 999  # 1,000 characters read, the last space dropped
    with pytest.raises(TooMuchText, match="page.html: the document has more than 1,000 characters"):
        html_text("<p>" + "word " * 201, max_chars=1000, path=Path("page.html"))
