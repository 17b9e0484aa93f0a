"""encyclopedic: the Free On-line Dictionary of Computing, one document per entry, read
from the dictd dictionary of the Debian package dict-foldoc (UTF-8, decoded strictly)."""
from __future__ import annotations

import re
from pathlib import Path

from tqdm import tqdm

from shear.corpus.debian import DICTD, broken, require
from shear.corpus.text import decode, doc, gunzip

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64_number(s: str) -> int:
    """dictd index numbers: base 64, most significant digit first."""
    n = 0
    for ch in s:
        n = n * 64 + _B64.index(ch)
    return n


def read_dictd(index: str | Path, data: str | Path,
               fix: str = "the dictionary is damaged; re-create it") -> list[tuple[str, str]]:
    """(headword, raw entry) of every distinct entry of a dictd dictionary, in file order.
    Several headwords may point at one entry; the entry is returned once. `fix` is the
    advice of the error for a file that is not UTF-8 or not gzip."""
    blob = gunzip(data, fix)  # a dictzip .dz file is plain gzip to a reader
    entries = {}
    for line in decode(Path(index).read_bytes(), index, "utf-8", fix).splitlines():
        headword, offset, length = line.split("\t")[:3]
        offset, length = _b64_number(offset), _b64_number(length)
        if headword.startswith("00-database") or headword.startswith("00database"):
            continue
        entries.setdefault((offset, length), headword)
    return [(h, decode(blob[o:o + n], data, "utf-8", fix, offset=o)) for (o, n), h in sorted(entries.items())]


def foldoc_entry(raw: str) -> tuple[str, str]:
    """(term, definition) of a FOLDOC entry, cleaned of its markup: the alias lines under
    the term, {cross-reference} braces, <category> tags and the closing (date) line;
    the wrapped lines of each paragraph are joined."""
    head, _, body = raw.strip("\n").partition("\n\n")
    term = head.split("\n")[0].strip()
    paragraphs = []
    for para in re.split(r"\n[ \t]*\n", body):
        p = " ".join(line.strip() for line in para.split("\n") if line.strip())
        if not p or re.fullmatch(r"\(\d{4}-\d\d-\d\d\)", p):
            continue
        p = re.sub(r"^(\d+\.\s+)?<[a-z][^<>{}]{0,80}>\s*", r"\1", p)
        for _ in range(2):  # nested braces are rare and at most two deep
            p = re.sub(r"\{([^{}]*)\}", r"\1", p)
        paragraphs.append(p)
    return term, "\n\n".join(paragraphs)


def read_foldoc(root: str | Path = DICTD) -> list[dict]:
    """FOLDOC: one document per entry, "<term>\\n\\n<definition>", title = the term."""
    root = Path(root)
    index = require(root / "foldoc.index", "encyclopedic", "dict-foldoc")
    data = require(root / "foldoc.dict.dz", "encyclopedic", "dict-foldoc")
    docs = []
    entries = read_dictd(index, data, broken("encyclopedic", "dict-foldoc"))
    for _, raw in tqdm(entries, desc="corpus encyclopedic", unit="entry"):
        term, definition = foldoc_entry(raw)
        if len(definition) >= 40:  # skip bare cross-references
            docs.append(doc(f"{term}\n\n{definition}", "dict-foldoc", "GFDL-1.1-or-later", term))
    return docs
