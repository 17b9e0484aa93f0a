"""shear/corpus/rst.py: the Python documentation sources and the section splitter."""
from __future__ import annotations

import pytest

from shear.corpus.rst import read_python_docs, split_rst_sections
from shear.errors import ShearError


def test_split_rst_sections():
    rst = "=====\nTitle\n=====\n\nSection\n=======\n\nWhy?\n----\n\nBecause.\n\nHow?\n----\n\nLike so.\n"
    assert split_rst_sections(rst) == [("Why?", "Because."), ("How?", "Like so.")]


def test_python_docs_reader(tmp_path):
    (tmp_path / "library").mkdir()
    (tmp_path / "faq").mkdir()
    (tmp_path / "library" / "json.rst.txt").write_text(":mod:`json`\n===========\n\nJSON encoder.\n")
    (tmp_path / "faq" / "general.rst.txt").write_text("Why?\n----\n\nBecause.\n")  # qa reads the FAQ
    assert [(d["title"], d["text"]) for d in read_python_docs(tmp_path)] == [
        ("library/json.rst.txt (1)", ":mod:`json`\n===========\n\nJSON encoder.")]
    (tmp_path / "bad.rst.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(ShearError, match=r"bad.rst.txt: not valid utf-8 at byte 3 \(0xe9\); reinstall Debian "
                                         r"package python3.11-doc or remove 'docs' from corpus.domains$"):
        read_python_docs(tmp_path)
