"""qa: questions and answers, one document per question, from the plain-text Debian FAQ
(Debian package debian-faq) and the Python FAQ (python3.11-doc, reStructuredText); both
UTF-8, decoded strictly."""
from __future__ import annotations

import re
from pathlib import Path

from tqdm import tqdm

from shear.corpus.debian import DEBIAN_FAQ, PYDOC, broken, require
from shear.corpus.rst import split_rst_sections
from shear.corpus.text import doc, gunzip, read_text, split_long


def split_debian_faq(text: str) -> list[tuple[str, str]]:
    """(question, answer) per numbered section of the plain-text Debian FAQ. Headings
    start at column 0 ("7.12. How do I ...?", wrapped over lines), answers are indented;
    the front matter and the footnote blocks after "-----" rules are skipped."""
    items: list[tuple[str, list[str]]] = []
    in_heading = skipping = False
    for line in text.replace("\xa0", " ").split("\n"):
        if re.match(r"(\d+\.)+\d*\.? |Chapter \d+\. ", line) and (items or line.startswith("Chapter")):
            items.append((line.strip(), []))
            in_heading, skipping = True, False
        elif re.fullmatch(r"-{20,}", line.strip()):
            skipping = True
        elif items and not skipping:
            if in_heading and line.strip() and not line.startswith(" "):
                items[-1] = (items[-1][0] + " " + line.strip(), items[-1][1])
            else:
                in_heading = False
                items[-1][1].append(line[4:] if line.startswith("    ") else line)
    return [(q, "\n".join(a).strip()) for q, a in items if "\n".join(a).strip()]


def read_qa(debian_faq: str | Path = DEBIAN_FAQ, python_faq: str | Path = PYDOC / "faq") -> list[dict]:
    """Questions and answers: the Debian FAQ and the Python FAQ, one document per question."""
    debian_faq = require(Path(debian_faq), "qa", "debian-faq")
    python_faq = require(Path(python_faq), "qa", "python3.11-doc")
    fix = broken("qa", "debian-faq")
    docs = []
    for q, a in split_debian_faq(read_text(debian_faq, "utf-8", fix, gunzip(debian_faq, fix))):
        docs.append(doc(f"{q}\n\n{a}", "debian-faq", "Debian-FAQ-verbatim", q))
    for path in tqdm(sorted(Path(python_faq).glob("*.rst.txt")), desc="corpus qa", unit="file"):
        text = read_text(path, "utf-8", broken("qa", "python3.11-doc"))
        for q, a in split_rst_sections(text):
            for k, chunk in enumerate(split_long(f"{q}\n\n{a}")):
                docs.append(doc(chunk, "python3.11-doc", "PSF-2.0", f"{q} ({k + 1})"))
    return docs
