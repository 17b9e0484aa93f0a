"""Text helpers every source shares: the document record, strict decoding, whitespace
clean-up, and cutting long text into documents at paragraph boundaries."""
from __future__ import annotations

import gzip
import re
import zlib
from pathlib import Path

from shear.errors import ShearError

DOC_CHARS = 4000  # target size of a document cut from a long source


def doc(text: str, source: str, license: str, title: str | None = None) -> dict:
    """A document record (the keys and order of every data/raw line)."""
    d = {"text": text, "source": source, "license": license}
    if title is not None:
        d["title"] = title
    return d


def decode(data: bytes, path: str | Path, encoding: str, fix: str, offset: int = 0) -> str:
    """`data` (bytes of `path` starting at byte `offset`) decoded strictly: an invalid byte
    is a one-line error naming the file, the byte's offset and `fix` (what to do), never
    a silent U+FFFD."""
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        raise ShearError(f"{path}: not valid {encoding} at byte {offset + e.start} "
                         f"(0x{data[e.start]:02x}); {fix}") from None


def read_text(path: str | Path, encoding: str, fix: str, data: bytes | None = None) -> str:
    """The text of a file (or its already read bytes `data`) decoded strictly, with
    universal newlines as Python's text mode reads it ("\\r\\n" and "\\r" become "\\n")."""
    text = decode(Path(path).read_bytes() if data is None else data, path, encoding, fix)
    return text.replace("\r\n", "\n").replace("\r", "\n")


def gunzip(path: str | Path, fix: str) -> bytes:
    """The decompressed bytes of a gzip (or dictzip) file; a corrupt file is one line with `fix`."""
    try:
        with gzip.open(path) as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise ShearError(f"{path}: not a readable gzip file ({type(e).__name__}); {fix}") from None


def normalise(text: str) -> str:
    """Light whitespace clean-up: unify newlines, drop control characters and trailing
    spaces, at most one blank line in a row. Indentation is kept (code needs it)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x0c", "\n")
    text = text.replace("\xa0", " ").replace("\ufeff", "")
    text = re.sub(r"[\x00-\x08\x0b\x0e-\x1f\x7f]", "", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def split_long(text: str, max_chars: int = DOC_CHARS) -> list[str]:
    """Cut `text` into runs of whole paragraphs (blank-line separated) of at most
    `max_chars` characters. A longer paragraph is cut at line ends (a longer line
    anywhere). A short tail is merged into the previous piece rather than left tiny."""
    units = []
    for para in re.split(r"\n[ \t]*\n", text.strip()):
        units.extend([para] if len(para) <= max_chars else _cut_lines(para, max_chars))
    chunks: list[str] = []
    for unit in units:
        if chunks and len(chunks[-1]) + 2 + len(unit) <= max_chars:
            chunks[-1] += "\n\n" + unit
        else:
            chunks.append(unit)
    if len(chunks) > 1 and len(chunks[-1]) < max_chars // 4:
        tail = chunks.pop()
        chunks[-1] += "\n\n" + tail
    return chunks


def _cut_lines(para: str, max_chars: int) -> list[str]:
    """Groups of whole lines of at most `max_chars` (a longer line is cut anywhere)."""
    lines = []
    for line in para.split("\n"):
        lines.extend([line[i:i + max_chars] for i in range(0, len(line), max_chars)] or [""])
    groups, current = [], None
    for line in lines:
        if current is not None and len(current) + 1 + len(line) > max_chars:
            groups.append(current)
            current = None
        current = line if current is None else f"{current}\n{line}"
    return groups + [current]
