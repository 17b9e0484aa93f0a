"""shear/corpus/text.py: cutting, clean-up, strict decoding."""
from __future__ import annotations

import gzip

import pytest

from shear.corpus.text import decode, gunzip, normalise, read_text, split_long
from shear.errors import ShearError


def test_split_long_keeps_paragraphs_and_bounds_size():
    paras = [f"paragraph {i} " + " ".join(["word"] * 150) for i in range(20)]  # ~760 chars each
    chunks = split_long("\n\n".join(paras), 4000)
    assert all(len(c) <= 4000 for c in chunks) and len(chunks) >= 4
    assert [p for c in chunks for p in c.split("\n\n")] == paras  # nothing lost or cut inside a paragraph
    one_line = split_long("x" * 9000, 4000)
    assert "".join(one_line) == "x" * 9000 and max(map(len, one_line)) <= 4000


def test_normalise():
    assert normalise("a \r\nb\xa0c\x00\n\n\n\n  d  \n") == "a\nb c\n\n  d"


def test_read_text_is_strict_and_reads_like_text_mode(tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes("caf\u00e9\r\nline\rend\n".encode())
    assert read_text(f, "utf-8", "fix it") == f.read_text(encoding="utf-8") == "caf\u00e9\nline\nend\n"
    f.write_bytes("caf\u00e9 ok\n".encode("latin-1"))
    with pytest.raises(ShearError) as e:
        read_text(f, "utf-8", "fix it")
    assert str(e.value) == f"{f}: not valid utf-8 at byte 3 (0xe9); fix it"
    assert read_text(f, "latin-1", "fix it") == "caf\u00e9 ok\n"


def test_decode_reports_the_offset_in_the_whole_file():
    with pytest.raises(ShearError, match=r"^x.dz: not valid utf-8 at byte 1002 \(0xff\); do this$"):
        decode(b"ab\xff", "x.dz", "utf-8", "do this", offset=1000)


def test_gunzip(tmp_path):
    (tmp_path / "ok.gz").write_bytes(gzip.compress(b"hello"))
    (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
    assert gunzip(tmp_path / "ok.gz", "fix") == b"hello"
    with pytest.raises(ShearError, match=r"bad.gz: not a readable gzip file \(BadGzipFile\); fix$"):
        gunzip(tmp_path / "bad.gz", "fix")
