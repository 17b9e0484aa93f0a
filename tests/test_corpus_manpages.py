"""shear/corpus/manpages.py: the roff converter and man-db's encoding rule on pages the test writes."""
from __future__ import annotations

import gzip

import pytest

from shear.corpus.manpages import read_man_pages, roff_to_text
from shear.corpus.text import normalise
from shear.errors import ShearError


def test_roff_to_text():
    page = "\n".join([
        '.\\" a comment', ".TH LS 1 2022", ".de XX", "junk inside a macro", "..", ".SH BEZEICHNUNG",
        "ls \\- Verzeichnisinhalte auflisten", '.SH "SIEHE AUCH"', ".PP",
        "Die \\fBOptionen\\fP und \\fI\\,DATEI\\/\\fR",
        "sind \\(lqwichtig\\(rq \\[u00E9]t\\['e]\\e.", ".TP", ".BR ls (1),", ".IP \\(bu 3", "Punkt eins",
        ".nr XY 3", ".if n .ds Aq '", "Text\\(em weiter \\\" trailing comment", ".br", "zweite Zeile",
        ".TS", "allbox;", "l l.", "Name\tWert", "_", "a\tT{", "eins", "T}", ".TE",
    ])
    text = normalise(roff_to_text(page))
    assert text == ("BEZEICHNUNG\n\nls - Verzeichnisinhalte auflisten\n\nSIEHE AUCH\n\n"
                    "Die Optionen und DATEI\nsind “wichtig” été\\.\n\nls(1),\n\n•\nPunkt eins\nText— weiter\n"
                    "zweite Zeile\nName\tWert\na\neins")


def test_man_page_reader(tmp_path):
    page = ".TH X 1\n.SH NOM\nx \\- un programme\n.SH DESCRIPTION\nIl fait des choses.\n.SH TRADUCTION\nMerci.\n"
    (tmp_path / "fr" / "man1").mkdir(parents=True)
    (tmp_path / "fr" / "man1" / "x.1.gz").write_bytes(gzip.compress(page.encode()))
    (tmp_path / "fr" / "man1" / "y.1.gz").symlink_to("x.1.gz")
    docs = read_man_pages(tmp_path, ("fr",))
    assert [(d["title"], d["text"], d["source"]) for d in docs] == [
        ("x(1) [fr] (1)", "NOM\n\nx - un programme\n\nDESCRIPTION\n\nIl fait des choses.", "manpages-fr")]


def _page(tmp_path, lang, name, data):
    (tmp_path / lang / "man1").mkdir(parents=True, exist_ok=True)
    (tmp_path / lang / "man1" / name).write_bytes(gzip.compress(data))


def test_encodings_follow_man_db(tmp_path, capsys):
    body = ".TH X 1\n.SH BESCHREIBUNG\nGr\u00fc\u00dfe aus K\u00f6ln.\n"
    _page(tmp_path, "de", "utf8.1.gz", body.encode())
    _page(tmp_path, "de", "latin1.1.gz", body.encode("latin-1"))  # undeclared: UTF-8 fails, legacy encoding
    _page(tmp_path, "de", "declared.1.gz", ('.\\" -*- coding: cp1252 -*-\n' + body + "\u20ac\n").encode("cp1252"))
    docs = {d["title"]: d["text"] for d in read_man_pages(tmp_path, ("de",))}
    expected = "BESCHREIBUNG\n\nGr\u00fc\u00dfe aus K\u00f6ln."
    assert docs == {"declared(1) [de] (1)": expected + "\n\u20ac", "latin1(1) [de] (1)": expected,
                    "utf8(1) [de] (1)": expected}
    assert capsys.readouterr().err.count("is not UTF-8 and declares no encoding; read as iso-8859-1") == 1


def test_undecodable_page_is_one_line(tmp_path):
    _page(tmp_path, "ja", "x.1.gz", b".TH X 1\n\xff\xfe\n")  # no legacy encoding known for 'ja'
    with pytest.raises(ShearError, match=r"x.1.gz: not valid utf-8 at byte 8 \(0xff\); reinstall Debian package "
                                         r"manpages-ja or remove 'multilingual' from corpus.domains$"):
        read_man_pages(tmp_path, ("ja",))
    _page(tmp_path, "de", "y.1.gz", b'.\\" -*- coding: klingon -*-\ntext\n')
    with pytest.raises(ShearError, match=r"y.1.gz: declares an unknown encoding 'klingon'; reinstall"):
        read_man_pages(tmp_path, ("de",))
