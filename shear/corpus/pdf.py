"""math: "Derivations of Applied Mathematics" (Debian package derivations), the text of
its PDF pages grouped into chapters; pypdf extracts the text."""
from __future__ import annotations

import re
from pathlib import Path

from tqdm import tqdm

from shear.corpus.debian import DERIVATIONS, require
from shear.corpus.text import doc, split_long

_LIGATURES = str.maketrans({"ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl"})
# A page's running head ("3.3. SCALARS, VECTORS 71", "684 CHAPTER 22. REMARKS") or a bare page number.
_RUNNING_HEAD = re.compile(r"(\d+|[ivxlc]+)(\s+[^a-z]+)?|[^a-z]+\s+(\d+|[ivxlc]+)")
_SECTION = re.compile(r"(Chapter \d+|Appendix [A-Z]|Preface|Appendices|Bibliography|Index|Contents"
                      r"|List of \w+|Part [IVX]+)")


def pdf_sections(pages: list[str]) -> list[tuple[str, str]]:
    """(heading, text) of the chapters, appendices and preface of a book's page texts;
    front matter, parts' title pages, bibliography and index are skipped. Running heads
    are removed, ligatures expanded and words hyphenated across lines rejoined."""
    sections: list[tuple[str, list[str]]] = []
    for page in pages:
        lines = page.translate(_LIGATURES).split("\n")
        if lines and _SECTION.fullmatch(lines[0].strip()):
            sections.append((lines[0].strip(), []))
        elif lines and _RUNNING_HEAD.fullmatch(lines[0].strip()):
            lines = lines[1:]
        if sections:
            sections[-1][1].extend(lines)
    kept = []
    for heading, lines in sections:
        if heading.startswith(("Chapter", "Appendix", "Preface")):
            text = "\n".join(line for line in lines if ". . . ." not in line)
            kept.append((heading, re.sub(r"([a-z])-\n([a-z])", r"\1\2", text)))
    return kept


def read_derivations(pdf: str | Path = DERIVATIONS) -> list[dict]:
    """The `derivations` book (PDF): each chapter cut into pieces of a few pages."""
    import pypdf

    pdf = require(Path(pdf), "math", "derivations")
    reader = pypdf.PdfReader(pdf)
    pages = [p.extract_text() or "" for p in tqdm(reader.pages, desc="corpus math", unit="page")]
    docs = []
    for heading, text in pdf_sections(pages):
        for k, chunk in enumerate(split_long(text)):
            docs.append(doc(chunk, "derivations", "GPL-2.0-only", f"{heading} ({k + 1})"))
    return docs
