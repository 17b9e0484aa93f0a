"""shear/corpus/pdf.py: chapters from a book's page texts."""
from __future__ import annotations

from shear.corpus.pdf import pdf_sections


def test_pdf_sections():
    pages = ["Title page", "Contents\n1 Intro . . . . 1",
             "Chapter 1\nIntroduction\nThe ﬁrst page of the intro-\nduction.",
             "2 CHAPTER 1. INTRODUCTION\nSecond page.", "Bibliography\n[1] A book.", "Index\nfoo, 3"]
    assert pdf_sections(pages) == [
        ("Chapter 1", "Chapter 1\nIntroduction\nThe first page of the introduction.\nSecond page.")]
