"""docs: the reStructuredText sources of the Python documentation (Debian package
python3.11-doc, `*.rst.txt`, UTF-8, decoded strictly), and the section splitter the
Python FAQ (domain qa) uses."""
from __future__ import annotations

import re
from pathlib import Path

from tqdm import tqdm

from shear.corpus.debian import PYDOC, broken, require
from shear.corpus.text import doc, read_text, split_long


def read_python_docs(root: str | Path = PYDOC) -> list[dict]:
    """The reStructuredText sources of the Python documentation (the FAQ goes to qa)."""
    root = require(Path(root), "docs", "python3.11-doc")
    docs = []
    for path in tqdm(sorted(root.rglob("*.rst.txt")), desc="corpus docs", unit="file"):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("faq/"):
            continue
        text = read_text(path, "utf-8", broken("docs", "python3.11-doc"))
        for k, chunk in enumerate(split_long(text)):
            docs.append(doc(chunk, "python3.11-doc", "PSF-2.0", f"{rel} ({k + 1})"))
    return docs


def split_rst_sections(text: str) -> list[tuple[str, str]]:
    """(heading, body) per section of a reStructuredText file (any underline level);
    sections with no body of their own (just a heading) are dropped."""
    lines = text.split("\n")
    starts = [i for i in range(len(lines) - 1)
              if lines[i].strip() and re.fullmatch(r"([=\-~^\"'`#*+])\1{2,}", lines[i + 1].strip())
              and len(lines[i + 1].strip()) >= len(lines[i].strip())]
    out = []
    for n, i in enumerate(starts):
        end = starts[n + 1] if n + 1 < len(starts) else len(lines)
        body = "\n".join(lines[i + 2:end]).strip()
        if body:
            out.append((lines[i].strip(), body))
    return out
