"""books: Jane Austen's six novels, read from the R lazy-load database of the Debian
package r-cran-janeaustenr (one character vector of lines per novel)."""
from __future__ import annotations

import re
import struct
import warnings
import zlib
from pathlib import Path
from typing import Iterable

import numpy as np
from tqdm import tqdm

from shear.corpus.debian import JANEAUSTENR, require
from shear.corpus.text import doc, split_long
from shear.errors import ShearError

BOOK_TITLES = {"emma": "Emma", "mansfieldpark": "Mansfield Park", "northangerabbey": "Northanger Abbey",
               "persuasion": "Persuasion", "prideprejudice": "Pride and Prejudice",
               "sensesensibility": "Sense and Sensibility"}


def read_r_lazyload(rdb: str | Path, rdx: str | Path, names: Iterable[str] | None = None) -> dict[str, object]:
    """The objects (all, or those in `names`) of an R lazy-load database (the
    data/Rdata.rdb/.rdx of an R package).

    The .rdx is a (compressed) serialized R list whose `variables` element maps each
    object name to (offset, length) in the .rdb; each record there is a 4-byte
    big-endian length followed by the zlib-compressed serialized object.
    """
    import rdata

    with warnings.catch_warnings():  # rdata warns that the index has no RDS header
        warnings.simplefilter("ignore")
        index = rdata.conversion.convert(rdata.parser.parse_data(Path(rdx).read_bytes()))
        if int(np.asarray(index["compressed"]).ravel()[0]) != 1:
            raise ShearError(f"{rdx}: only zlib-compressed R lazy-load data is supported")
        blob = Path(rdb).read_bytes()
        objects = {}
        for name, (offset, length) in index["variables"].items():
            if names is not None and str(name) not in names:
                continue
            record = blob[int(offset):int(offset) + int(length)]
            (size,) = struct.unpack(">I", record[:4])
            data = zlib.decompress(record[4:])
            if len(data) != size:
                raise ShearError(f"{rdb}: object {name} is corrupt (expected {size} bytes, got {len(data)})")
            objects[str(name)] = rdata.conversion.convert(rdata.parser.parse_data(data))
    return objects


def read_books(root: str | Path = JANEAUSTENR) -> list[dict]:
    """Jane Austen's novels: each chapter cut into runs of paragraphs (one per line in
    the R data, lines of a paragraph joined by spaces, paragraphs by a blank line)."""
    root = Path(root)
    require(root / "Rdata.rdb", "books", "r-cran-janeaustenr")
    books = read_r_lazyload(root / "Rdata.rdb", root / "Rdata.rdx")
    docs = []
    for name in tqdm(sorted(books), desc="corpus books", unit="book"):
        book = BOOK_TITLES.get(name, name)
        for chapter, paragraphs in _chapters([str(x) if x is not None else "" for x in books[name]]):
            for k, text in enumerate(split_long("\n\n".join(paragraphs))):
                docs.append(doc(text, "r-cran-janeaustenr", "MIT", f"{book}, {chapter} ({k + 1})"))
    return docs


def _chapters(lines: list[str]) -> list[tuple[str, list[str]]]:
    """(heading, paragraphs) per chapter; the title page before the first chapter is skipped."""
    chapters, volume, paragraph = [], "", []
    for line in lines + [""]:
        heading = re.fullmatch(r"\s*(VOLUME|CHAPTER|Chapter)\s+([IVXLC\d]+)\.?\s*", line)
        if heading or not line.strip():
            if paragraph and chapters:
                chapters[-1][1].append(" ".join(paragraph))
            paragraph = []
        if heading:
            if heading.group(1) == "VOLUME":
                volume = f"Volume {heading.group(2)}, "
            else:
                chapters.append((f"{volume}Chapter {heading.group(2)}", []))
        elif line.strip():
            paragraph.append(line.strip())
    return [c for c in chapters if c[1]]
