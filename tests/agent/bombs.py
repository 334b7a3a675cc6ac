"""Hostile documents, built by hand (small on disk, costly to parse), shared by the agent's tests."""

from __future__ import annotations

import zlib

TEXT_OP = b"BT /F1 12 Tf 72 720 Td (%s) Tj ET"


def pdf(contents: list[bytes]) -> bytes:
    """A minimal valid PDF: one page per content stream (Flate-compressed), one Helvetica font."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"", b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for content in contents:
        data = zlib.compress(content, 9)
        objects.append(b"<< /Length %d /Filter /FlateDecode >>\nstream\n%s\nendstream" % (len(data), data))
        objects.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> "
                       b">> /Contents %d 0 R >>" % len(objects))
        kids.append(len(objects))
    objects[1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(b"%d 0 R" % k for k in kids), len(kids))
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def text_pdf(pages: list[str]) -> bytes:
    return pdf([TEXT_OP % page.encode() for page in pages])


def string_bomb(chars: int = 40_000_000) -> bytes:
    """One page showing one string of `chars` letters: ~40 KB of PDF that decompresses to 40 MB."""
    return pdf([TEXT_OP % (b"A" * chars)])


def operator_bomb(operators: int = 400_000) -> bytes:
    """One page of `operators` short text operators (~54 KB of PDF); pypdf spends minutes on it."""
    return pdf([b"BT /F1 12 Tf 72 720 Td " + b"(AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA) Tj " * operators + b"ET"])


def many_pages(count: int) -> bytes:
    return pdf([TEXT_OP % b"p"] * count)


def unclosed_tags(size: int = 8 * 2**20) -> bytes:
    """`<a x` repeated: quadratic for the stdlib html.parser of Python 3.11.7."""
    return b"<html><body>" + b"<a x" * (size // 4)
