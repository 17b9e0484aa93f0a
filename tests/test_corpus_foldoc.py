"""shear/corpus/foldoc.py: a dictd dictionary the test writes, read back as FOLDOC entries."""
from __future__ import annotations

import gzip

import pytest

from shear.corpus.foldoc import _B64, read_dictd, read_foldoc
from shear.errors import ShearError


def _b64(n: int) -> str:
    digits = ""
    while True:
        digits = _B64[n % 64] + digits
        n //= 64
        if n == 0:
            return digits


def test_dictd_foldoc(tmp_path):
    entries = [
        ("flag", "flag\n\n   1. <programming> A variable or quantity that can take on one\n"
                 "   of two values; see also {hidden flag}.\n\n   [{Jargon File}]\n\n   (1998-05-02)\n\n"),
        ("exclamation mark", "exclamation mark\n!\nbang\n\n   <character> The character \"!\" with {ASCII}\n"
                             "   code 33, also called bang.\n\n   (1998-09-17)\n\n"),
        ("tiny", "tiny\n\n   {flag}.\n\n"),
    ]
    data, index = b"", ["00-database-info\tA\tB"]
    for term, raw in entries:
        b = raw.encode()
        index.append(f"{term}\t{_b64(len(data))}\t{_b64(len(b))}")
        if term == "exclamation mark":
            index.append(f"!\t{_b64(len(data))}\t{_b64(len(b))}")  # an alias: same entry
        data += b
    (tmp_path / "foldoc.index").write_text("\n".join(index) + "\n")
    (tmp_path / "foldoc.dict.dz").write_bytes(gzip.compress(data))
    assert [h for h, _ in read_dictd(tmp_path / "foldoc.index", tmp_path / "foldoc.dict.dz")] == \
        ["flag", "exclamation mark", "tiny"]
    docs = read_foldoc(tmp_path)
    assert [d["title"] for d in docs] == ["flag", "exclamation mark"]  # "tiny" is a bare cross-reference
    assert docs[0]["text"] == ("flag\n\n1. A variable or quantity that can take on one of two values; "
                               "see also hidden flag.\n\n[Jargon File]")
    assert docs[1]["text"] == 'exclamation mark\n\nThe character "!" with ASCII code 33, also called bang.'


def test_entry_not_utf8_is_one_line_with_its_offset(tmp_path):
    good, bad = b"ok\n\n   fine entry.\n\n", "caf\u00e9\n\n   latin-1 entry.\n\n".encode("latin-1")
    (tmp_path / "foldoc.index").write_text(f"ok\tA\t{_b64(len(good))}\ncafe\t{_b64(len(good))}\t{_b64(len(bad))}\n")
    (tmp_path / "foldoc.dict.dz").write_bytes(gzip.compress(good + bad))
    with pytest.raises(ShearError) as e:
        read_foldoc(tmp_path)
    assert str(e.value) == (f"{tmp_path / 'foldoc.dict.dz'}: not valid utf-8 at byte {len(good) + 3} (0xe9); "
                            "reinstall Debian package dict-foldoc or remove 'encyclopedic' from corpus.domains")
