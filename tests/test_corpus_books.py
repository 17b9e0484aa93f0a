"""shear/corpus/books.py: an R lazy-load database the test writes, read back as novels."""
from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import pytest

from shear.corpus.books import read_books, read_r_lazyload
from shear.corpus.debian import JANEAUSTENR
from shear.corpus.text import DOC_CHARS


def _r_int(*values):
    return b"".join(struct.pack(">i", v) for v in values)


def _r_chars(s):
    b = s.encode()
    return _r_int(9 | (8 << 12), len(b)) + b  # CHARSXP, UTF-8


def _r_strings(values):
    return _r_int(16, len(values)) + b"".join(_r_chars(v) for v in values)  # STRSXP


def _r_named_list(items):
    """VECSXP with a names attribute (pairlist: LISTSXP with tag `names`, then NILVALUE)."""
    body = _r_int(19 | (1 << 9), len(items)) + b"".join(v for _, v in items)
    return body + _r_int(2 | (1 << 10), 1) + _r_chars("names") + _r_strings([k for k, _ in items]) + _r_int(254)


def _r_serialize(obj):
    return b"X\n" + _r_int(2, 0x040200, 0x020300) + obj  # XDR, format version 2


def write_rdata(root: Path, books: dict[str, list[str]]) -> None:
    """An R package's data/Rdata.rdb + Rdata.rdx holding character vectors."""
    blob, variables = b"", []
    for name, lines in books.items():
        record = _r_serialize(_r_strings(lines))
        packed = struct.pack(">I", len(record)) + zlib.compress(record)
        variables.append((name, _r_int(13, 2, len(blob), len(packed))))  # INTSXP (offset, length)
        blob += packed
    index = _r_named_list([("variables", _r_named_list(variables)), ("references", _r_int(19, 0)),
                           ("compressed", _r_int(10, 1, 1))])
    root.mkdir(parents=True, exist_ok=True)
    (root / "Rdata.rdb").write_bytes(blob)
    (root / "Rdata.rdx").write_bytes(gzip.compress(_r_serialize(index)))


def test_books_from_r_lazyload(tmp_path):
    para = ["It is a truth universally acknowledged, that a single man in possession",
            "of a good fortune, must be in want of a wife.", ""]
    lines = ["PERSUASION", "", "by Jane Austen", "", "VOLUME I", "", "CHAPTER I", ""] + para * 60 \
        + ["CHAPTER II", ""] + para * 2 + ["VOLUME II", "CHAPTER I", ""] + para
    write_rdata(tmp_path, {"persuasion": lines, "emma": ["Chapter 1", "", "Emma Woodhouse, handsome."]})
    objects = read_r_lazyload(tmp_path / "Rdata.rdb", tmp_path / "Rdata.rdx")
    assert list(objects["persuasion"]) == lines
    docs = read_books(tmp_path)
    titles = [d["title"] for d in docs]
    assert titles[0] == "Emma, Chapter 1 (1)" and docs[0]["text"] == "Emma Woodhouse, handsome."
    assert "Persuasion, Volume I, Chapter I (2)" in titles and titles[-1] == "Persuasion, Volume II, Chapter I (1)"
    first = docs[1]["text"].split("\n\n")
    assert first[0] == " ".join(para[:2]) and len(docs[1]["text"]) <= DOC_CHARS
    assert not any("by Jane Austen" in d["text"] for d in docs)  # the title page is skipped


@pytest.mark.skipif(not (JANEAUSTENR / "Rdata.rdb").exists(), reason="r-cran-janeaustenr not installed")
def test_real_janeaustenr():
    objects = read_r_lazyload(JANEAUSTENR / "Rdata.rdb", JANEAUSTENR / "Rdata.rdx",
                                     names=["persuasion"])
    assert list(objects) == ["persuasion"]
    assert "Sir Walter Elliot, of Kellynch Hall" in " ".join(objects["persuasion"][:40])
