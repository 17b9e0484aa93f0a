"""shear/corpus/faq.py: the Debian FAQ splitter and the qa reader."""
from __future__ import annotations

import gzip

from shear.corpus.faq import read_qa, split_debian_faq

FAQ = ("Table of Contents\n\n1. Basics\n    1.1. What?\n\nChapter 1. Basics\n\n    Intro.\n\n"
       "1.1.\xa0What is a long\nquestion?\n\n    The answer\n    continues.\n\n"
       "---------------------------------------------------------------------\n\n    ^[1] a footnote\n\n"
       "1.2. Empty?\n\n")


def test_split_debian_faq():
    assert split_debian_faq(FAQ) == [("Chapter 1. Basics", "Intro."),
                                     ("1.1. What is a long question?", "The answer\ncontinues.")]


def test_read_qa(tmp_path):
    (tmp_path / "faq.txt.gz").write_bytes(gzip.compress(FAQ.encode()))
    (tmp_path / "pyfaq").mkdir()
    (tmp_path / "pyfaq" / "general.rst.txt").write_text("Why?\n----\n\nBecause.\n")
    docs = read_qa(tmp_path / "faq.txt.gz", tmp_path / "pyfaq")
    assert [(d["source"], d["title"]) for d in docs] == [
        ("debian-faq", "Chapter 1. Basics"), ("debian-faq", "1.1. What is a long question?"),
        ("python3.11-doc", "Why? (1)")]
    assert docs[-1]["text"] == "Why?\n\nBecause."
