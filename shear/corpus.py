"""The text corpus: documents per domain from installed sources and user files.

A document is a dict {"text", "source", "license", "title"?}. Built-in domains read
real text that Debian packages install (no network):

    books         Jane Austen's six novels        r-cran-janeaustenr (R lazy-load data)
    encyclopedic  FOLDOC, one entry a document     dict-foldoc (dictd index + .dz)
    docs          Python documentation sources    python3.11-doc (*.rst.txt, minus faq/)
    code          the Python standard library     the running interpreter
    math          "Derivations of Applied Math."  derivations (PDF)
    qa            Debian FAQ + Python FAQ         debian-faq, python3.11-doc (faq/)
    multilingual  German and French man pages     manpages-de, manpages-fr (roff)

Users add their own with `read_user_source` (text files, JSONL, Parquet, a local
Hugging Face dataset). `select_documents` then normalises whitespace, drops short and
duplicate documents, caps each domain, and sets held-out documents aside. Long sources
are cut into documents of about DOC_CHARS characters at paragraph boundaries, so that
every domain has enough documents for document-level train/calib/eval splits.
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import json
import re
import struct
import sysconfig
import warnings
import zlib
from pathlib import Path
from typing import Iterable

import numpy as np
from tqdm import tqdm

from shear.errors import ShearError

DOC_CHARS = 4000  # target size of a document cut from a long source

JANEAUSTENR = Path("/usr/lib/R/site-library/janeaustenr/data")
DICTD = Path("/usr/share/dictd")
PYDOC = Path("/usr/share/doc/python3.11/html/_sources")
DERIVATIONS = Path("/usr/share/doc/derivations/derivations.pdf")
DEBIAN_FAQ = Path("/usr/share/doc/debian/FAQ/debian-faq.en.txt.gz")
MAN = Path("/usr/share/man")


# ----------------------------------------------------------------------------- helpers


def require(path: Path, domain: str, package: str) -> Path:
    """Return `path`, or raise the one-line error that names the missing Debian package."""
    if not Path(path).exists():
        raise ShearError(
            f"corpus.domains: {domain!r} needs Debian package {package} ({path} not found); "
            "run `make setup` or remove it from corpus.domains"
        )
    return Path(path)


def doc(text: str, source: str, license: str, title: str | None = None) -> dict:
    """A document record (the keys and order of every data/raw line)."""
    d = {"text": text, "source": source, "license": license}
    if title is not None:
        d["title"] = title
    return d


def normalise(text: str) -> str:
    """Light whitespace clean-up: unify newlines, drop control characters and trailing
    spaces, at most one blank line in a row. Indentation is kept (code needs it)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x0c", "\n")
    text = text.replace("\xa0", " ").replace("\ufeff", "")
    text = re.sub(r"[\x00-\x08\x0b\x0e-\x1f\x7f]", "", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def split_long(text: str, max_chars: int = DOC_CHARS) -> list[str]:
    """Cut `text` into runs of whole paragraphs (blank-line separated) of at most
    `max_chars` characters. A longer paragraph is cut at line ends (a longer line
    anywhere). A short tail is merged into the previous piece rather than left tiny."""
    units = []
    for para in re.split(r"\n[ \t]*\n", text.strip()):
        units.extend([para] if len(para) <= max_chars else _cut_lines(para, max_chars))
    chunks: list[str] = []
    for unit in units:
        if chunks and len(chunks[-1]) + 2 + len(unit) <= max_chars:
            chunks[-1] += "\n\n" + unit
        else:
            chunks.append(unit)
    if len(chunks) > 1 and len(chunks[-1]) < max_chars // 4:
        tail = chunks.pop()
        chunks[-1] += "\n\n" + tail
    return chunks


def _cut_lines(para: str, max_chars: int) -> list[str]:
    """Groups of whole lines of at most `max_chars` (a longer line is cut anywhere)."""
    lines = []
    for line in para.split("\n"):
        lines.extend([line[i:i + max_chars] for i in range(0, len(line), max_chars)] or [""])
    groups, current = [], None
    for line in lines:
        if current is not None and len(current) + 1 + len(line) > max_chars:
            groups.append(current)
            current = None
        current = line if current is None else f"{current}\n{line}"
    return groups + [current]


# ----------------------------------------------------------------------------- processing


def select_documents(by_domain: dict[str, list[dict]], max_chars: int, min_doc_chars: int,
                     heldout_docs: int, seed: int) -> tuple[dict, dict, dict]:
    """Clean, deduplicate, cap and split the documents of every domain.

    - whitespace is normalised; documents shorter than `min_doc_chars` are dropped;
    - an exact duplicate (same normalised text) is dropped, in any domain: the first
      seen wins, domains in the order given;
    - each domain's documents are shuffled with a generator seeded by (seed, domain);
      the first `heldout_docs` go to held-out (at most a fifth of the domain, so a small
      domain keeps most of its text), the next ones to raw until `max_chars` would be
      exceeded. Both keep the sources' reading order.

    Returns (raw, heldout, report): raw/heldout map domain -> documents.
    """
    seen: set[bytes] = set()
    raw, heldout, report = {}, {}, {"domains": {}}
    for domain, docs in by_domain.items():
        kept, short, dupes = [], 0, 0
        for d in docs:
            text = normalise(d["text"])
            if len(text) < min_doc_chars:
                short += 1
                continue
            key = hashlib.sha1(text.encode()).digest()
            if key in seen:
                dupes += 1
                continue
            seen.add(key)
            kept.append({**d, "text": text})
        if not kept:
            raise ShearError(
                f"corpus: domain {domain!r} has no document of at least {min_doc_chars} characters "
                "(after removing duplicates); check its sources or lower corpus.min_doc_chars"
            )
        rng = np.random.default_rng([seed, zlib.crc32(domain.encode())])
        order = rng.permutation(len(kept)).tolist()
        n_held = min(heldout_docs, len(kept) // 5)
        held_idx, raw_idx, total = order[:n_held], [], 0
        for i in order[n_held:]:
            if raw_idx and total + len(kept[i]["text"]) > max_chars:
                break
            raw_idx.append(i)
            total += len(kept[i]["text"])
        raw[domain] = [kept[i] for i in sorted(raw_idx)]
        heldout[domain] = [kept[i] for i in sorted(held_idx)]
        report["domains"][domain] = {
            "documents": len(raw[domain]),
            "characters": total,
            "heldout_documents": len(heldout[domain]),
            "heldout_characters": sum(len(d["text"]) for d in heldout[domain]),
            "dropped_short": short,
            "dropped_duplicates": dupes,
            "dropped_by_cap": len(kept) - len(raw_idx) - n_held,
            "sources": sorted({d["source"] for d in raw[domain] + heldout[domain]}),
            "license": ", ".join(sorted({d["license"] for d in raw[domain] + heldout[domain]})),
        }
    stats = report["domains"].values()
    keys = ("documents", "characters", "heldout_documents", "heldout_characters",
            "dropped_short", "dropped_duplicates", "dropped_by_cap")
    report["total"] = {k: sum(s[k] for s in stats) for k in keys}
    report["settings"] = {"max_chars_per_domain": max_chars, "min_doc_chars": min_doc_chars,
                          "heldout_docs": heldout_docs, "seed": seed, "doc_chars": DOC_CHARS}
    return raw, heldout, report


def write_jsonl(path: str | Path, docs: Iterable[dict]) -> None:
    """One JSON object per line, UTF-8, keys in the order of `doc`."""
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")


def collect_documents(domains: list[str], user_sources: list[dict]) -> dict[str, list[dict]]:
    """Documents per domain: the built-in domains in the order given, then the user
    sources (each added to its domain, new or built-in)."""
    for domain in domains:  # fail before the long reads when a package is missing...
        for package, path in PACKAGES.get(domain, ()):
            require(path, domain, package)
    user_docs = [read_user_source(source, i) for i, source in enumerate(user_sources)]  # ...or a path
    by_domain = {domain: READERS[domain]() for domain in domains}
    for source, docs in zip(user_sources, user_docs):
        by_domain.setdefault(source["domain"], []).extend(docs)
    return by_domain


# ----------------------------------------------------------------------------- books


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


BOOK_TITLES = {"emma": "Emma", "mansfieldpark": "Mansfield Park", "northangerabbey": "Northanger Abbey",
               "persuasion": "Persuasion", "prideprejudice": "Pride and Prejudice",
               "sensesensibility": "Sense and Sensibility"}


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


# ----------------------------------------------------------------------------- encyclopedic

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64_number(s: str) -> int:
    """dictd index numbers: base 64, most significant digit first."""
    n = 0
    for ch in s:
        n = n * 64 + _B64.index(ch)
    return n


def read_dictd(index: str | Path, data: str | Path) -> list[tuple[str, str]]:
    """(headword, raw entry) of every distinct entry of a dictd dictionary, in file order.
    Several headwords may point at one entry; the entry is returned once."""
    blob = gzip.open(data).read()  # a dictzip .dz file is plain gzip to a reader
    entries = {}
    for line in Path(index).read_text(encoding="utf-8").splitlines():
        headword, offset, length = line.split("\t")[:3]
        offset, length = _b64_number(offset), _b64_number(length)
        if headword.startswith("00-database") or headword.startswith("00database"):
            continue
        entries.setdefault((offset, length), headword)
    return [(h, blob[o:o + n].decode("utf-8", errors="replace")) for (o, n), h in sorted(entries.items())]


def foldoc_entry(raw: str) -> tuple[str, str]:
    """(term, definition) of a FOLDOC entry, cleaned of its markup: the alias lines under
    the term, {cross-reference} braces, <category> tags and the closing (date) line;
    the wrapped lines of each paragraph are joined."""
    head, _, body = raw.strip("\n").partition("\n\n")
    term = head.split("\n")[0].strip()
    paragraphs = []
    for para in re.split(r"\n[ \t]*\n", body):
        p = " ".join(line.strip() for line in para.split("\n") if line.strip())
        if not p or re.fullmatch(r"\(\d{4}-\d\d-\d\d\)", p):
            continue
        p = re.sub(r"^(\d+\.\s+)?<[a-z][^<>{}]{0,80}>\s*", r"\1", p)
        for _ in range(2):  # nested braces are rare and at most two deep
            p = re.sub(r"\{([^{}]*)\}", r"\1", p)
        paragraphs.append(p)
    return term, "\n\n".join(paragraphs)


def read_foldoc(root: str | Path = DICTD) -> list[dict]:
    """FOLDOC: one document per entry, "<term>\\n\\n<definition>", title = the term."""
    root = Path(root)
    index = require(root / "foldoc.index", "encyclopedic", "dict-foldoc")
    data = require(root / "foldoc.dict.dz", "encyclopedic", "dict-foldoc")
    docs = []
    for _, raw in tqdm(read_dictd(index, data), desc="corpus encyclopedic", unit="entry"):
        term, definition = foldoc_entry(raw)
        if len(definition) >= 40:  # skip bare cross-references
            docs.append(doc(f"{term}\n\n{definition}", "dict-foldoc", "GFDL-1.1-or-later", term))
    return docs


# ----------------------------------------------------------------------------- docs, code


def read_python_docs(root: str | Path = PYDOC) -> list[dict]:
    """The reStructuredText sources of the Python documentation (the FAQ goes to qa)."""
    root = require(Path(root), "docs", "python3.11-doc")
    docs = []
    for path in tqdm(sorted(root.rglob("*.rst.txt")), desc="corpus docs", unit="file"):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("faq/"):
            continue
        for k, text in enumerate(split_long(path.read_text(encoding="utf-8", errors="replace"))):
            docs.append(doc(text, "python3.11-doc", "PSF-2.0", f"{rel} ({k + 1})"))
    return docs


SKIP_CODE_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "pydoc_data", "__pycache__"}
MAX_CODE_BYTES = 256_000  # larger files are generated tables, not code worth learning from


def read_stdlib_code(root: str | Path | None = None) -> list[dict]:
    """The .py files of the Python standard library (default: the running interpreter's),
    without installed third-party packages, test suites and very large generated files."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise ShearError(f"corpus.domains: 'code' reads the Python standard library, but {root} is not a directory")
    docs = []
    files = [p for p in sorted(root.rglob("*.py")) if not SKIP_CODE_DIRS & set(p.relative_to(root).parts[:-1])]
    for path in tqdm(files, desc="corpus code", unit="file"):
        if path.stat().st_size > MAX_CODE_BYTES:
            continue
        rel = path.relative_to(root).as_posix()
        for k, text in enumerate(split_long(path.read_text(encoding="utf-8", errors="replace"))):
            docs.append(doc(text, "python-stdlib", "PSF-2.0", f"{rel} ({k + 1})"))
    return docs


# ----------------------------------------------------------------------------- math

_LIGATURES = str.maketrans({"ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl"})
# A page's running head ("3.3. SCALARS, VECTORS 71", "684 CHAPTER 22. REMARKS") or a bare page number.
_RUNNING_HEAD = re.compile(r"(\d+|[ivxlc]+)(\s+[^a-z]+)?|[^a-z]+\s+(\d+|[ivxlc]+)")
_SECTION = re.compile(r"(Chapter \d+|Appendix [A-Z]|Preface|Appendices|Bibliography|Index|Contents|List of \w+|Part [IVX]+)")


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


# ----------------------------------------------------------------------------- qa


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


def read_qa(debian_faq: str | Path = DEBIAN_FAQ, python_faq: str | Path = PYDOC / "faq") -> list[dict]:
    """Questions and answers: the Debian FAQ and the Python FAQ, one document per question."""
    debian_faq = require(Path(debian_faq), "qa", "debian-faq")
    python_faq = require(Path(python_faq), "qa", "python3.11-doc")
    docs = []
    for q, a in split_debian_faq(gzip.open(debian_faq, "rt", encoding="utf-8").read()):
        docs.append(doc(f"{q}\n\n{a}", "debian-faq", "Debian-FAQ-verbatim", q))
    for path in tqdm(sorted(Path(python_faq).glob("*.rst.txt")), desc="corpus qa", unit="file"):
        for q, a in split_rst_sections(path.read_text(encoding="utf-8", errors="replace")):
            for k, text in enumerate(split_long(f"{q}\n\n{a}")):
                docs.append(doc(text, "python3.11-doc", "PSF-2.0", f"{q} ({k + 1})"))
    return docs


# ----------------------------------------------------------------------------- multilingual

_ROFF_NAMED = {
    "em": "—", "en": "–", "hy": "-", "mi": "-", "aq": "'", "dq": '"', "lq": "“", "rq": "”", "oq": "‘",
    "cq": "’", "Fo": "«", "Fc": "»", "fo": "‹", "fc": "›", "bu": "•", "co": "©", "rg": "®", "tm": "™",
    "de": "°", "mu": "×", "di": "÷", "+-": "±", "<=": "≤", ">=": "≥", "!=": "≠", "->": "→", "<-": "←",
    "rs": "\\", "sl": "/", "ba": "|", "or": "|", "at": "@", "sh": "#", "ti": "~", "ha": "^", "ga": "`",
    "dg": "†", "ss": "ß", "pc": "·", "sc": "§", "Eu": "€", "eu": "€", "12": "½", "14": "¼", "34": "¾",
    ":a": "ä", ":o": "ö", ":u": "ü", ":A": "Ä", ":O": "Ö", ":U": "Ü", "'e": "é", "`e": "è", "^e": "ê",
    "'E": "É", "`a": "à", "^a": "â", ",c": "ç", "^o": "ô", "^i": "î", ":e": "ë", ":i": "ï", "^u": "û",
    "`u": "ù", "oe": "œ", "OE": "Œ", "ae": "æ", "AE": "Æ",
}
# one-character escapes that print something; the others (\\& \\, \\/ \\| \\c \\% ...) print nothing
_ROFF_SINGLE = {"-": "-", "e": "\\", "\\": "\\", "0": " ", " ": " ", "~": " ", "t": "\t", "'": "'",
                "`": "`", ".": "."}
_ROFF_ESCAPE = re.compile(r"""\\(?:
      \((?P<two>..)                                   # \(xx   named character
    | \[(?P<name>[^\]]*)\]                            # \[xx]  named character
    | [fFgkmnMVYz*$][+-]?(?:\[[^\]]*\]|\(..|.)        # font, colour, register, string...
    | s[+-]?(?:\d\d?|\[[^\]]*\]|\(..|'[^']*')         # point size
    | [hvwlLoDbxXNZRHSAB]'[^']*'                      # escapes with a quoted argument
    | (?P<one>.)                                      # one-character escapes
)""", re.X)
_ROFF_HEADINGS = {"SH", "SS", "Sh", "Ss"}
_ROFF_BREAKS = {"PP", "LP", "P", "TP", "TQ", "HP", "sp", "Sp", "Pp", "RS", "RE"}
_ROFF_FONT_ALTERNATING = {"BI", "BR", "IB", "IR", "RB", "RI"}
# man/pod2man/groff macros whose arguments are not text
_ROFF_DROP = {"TH", "UR", "UE", "MT", "ME", "IX", "Vb", "Ve", "EX", "EE", "Dd", "Dt", "Os", "Bl", "El",
              "Bd", "Ed", "PD", "SY", "YS", "OP", "TS", "TE"}


def _roff_inline(text: str) -> str:
    def repl(m: re.Match) -> str:
        if m.group("two") is not None:
            return _ROFF_NAMED.get(m.group("two"), "")
        if m.group("name") is not None:
            name = m.group("name")
            if re.fullmatch(r"u[0-9A-Fa-f]{4,6}", name):
                return chr(int(name[1:], 16))
            return _ROFF_NAMED.get(name, "")
        if m.group("one") is not None:
            return _ROFF_SINGLE.get(m.group("one"), "")
        return ""

    return _ROFF_ESCAPE.sub(repl, text)


def _roff_args(rest: str) -> list[str]:
    """Macro arguments: blank-separated words, "double quoted" groups ("" is a quote)."""
    return [q.replace('""', '"') if q or w == "" else w
            for q, w in re.findall(r'"((?:[^"]|"")*)"?|(\S+)', rest)]


def roff_to_text(source: str) -> str:
    """Plain text of a man page (roff): comments, macro and request names, conditionals,
    macro definitions and table layouts are dropped; the text and the text arguments of
    macros (headings, font macros, list tags) are kept; paragraph macros become blank lines."""
    out: list[str] = []
    in_definition = in_table_layout = False
    for line in source.split("\n"):
        if in_definition:  # .de/.am/.ig blocks run to a line starting with ".."
            in_definition = not line.startswith("..")
            continue
        if not line.startswith((".", "'")):  # a text line
            if in_table_layout:  # tbl: options and layout lines, the last one ends with "."
                in_table_layout = not line.rstrip().endswith(".")
            elif not re.fullmatch(r"\s*[_=]\s*", line):  # not a table rule
                text = re.sub(r'(?<!\\)\\["#].*', "", line).replace("T{", "").replace("T}", "")
                out.append(_roff_inline(text))
            continue
        name, rest = re.match(r"[.'][ \t]*(\S*)[ \t]*(.*)", line).groups()
        if not name or name.startswith(("\\\"", "\\#")):
            continue  # a comment or an empty request
        if name in ("de", "de1", "am", "am1", "ig"):
            in_definition = True
            continue
        in_table_layout = name == "TS"
        args = [_roff_inline(a) for a in _roff_args(re.sub(r'(?<!\\)\\".*', "", rest))]
        if name in _ROFF_HEADINGS:
            out += ["", " ".join(args), ""]
        elif name in _ROFF_BREAKS:
            out.append("")
        elif name == "IP":
            out += ["", args[0]] if args and args[0] else [""]
        elif name in _ROFF_FONT_ALTERNATING:
            out.append("".join(args))
        elif args and not name[0].islower() and name not in _ROFF_DROP:
            out.append(" ".join(args))  # B, I, SM, mdoc's Nm/Nd/Fl ...: keep the words
        # everything else: roff requests (lower case) and macros whose arguments are not text
    return "\n".join(out)


def read_man_pages(root: str | Path = MAN, languages: tuple[str, ...] = ("de", "fr")) -> list[dict]:
    """Translated man pages (manpages-<lang>) as plain text, one page (cut when long) each.
    Symbolic links (aliases of another page) and the translators' section are skipped."""
    docs = []
    for lang in languages:
        lang_root = require(Path(root) / lang, "multilingual", f"manpages-{lang}")
        files = [p for p in sorted(lang_root.glob("man*/*.gz")) if not p.is_symlink()]
        for path in tqdm(files, desc=f"corpus multilingual ({lang})", unit="page"):
            name = path.name[:-3]  # ls.1
            page, _, section = name.rpartition(".")
            text = roff_to_text(gzip.open(path).read().decode("utf-8", errors="replace"))
            # the translators' section (credits and a licence notice) is the same on every page
            text = re.split(r"\n(?:ÜBERSETZUNG|TRADUCTION)\n", text)[0]
            for k, chunk in enumerate(split_long(normalise(text))):
                docs.append(doc(chunk, f"manpages-{lang}", "GPL-3.0-or-later", f"{page}({section}) [{lang}] ({k + 1})"))
    return docs


READERS = {
    "books": read_books,
    "encyclopedic": read_foldoc,
    "docs": read_python_docs,
    "code": read_stdlib_code,
    "math": read_derivations,
    "qa": read_qa,
    "multilingual": read_man_pages,
}
# (Debian package, default path) that each built-in domain needs; `code` needs none.
PACKAGES = {
    "books": [("r-cran-janeaustenr", JANEAUSTENR / "Rdata.rdb")],
    "encyclopedic": [("dict-foldoc", DICTD / "foldoc.index"), ("dict-foldoc", DICTD / "foldoc.dict.dz")],
    "docs": [("python3.11-doc", PYDOC)],
    "math": [("derivations", DERIVATIONS)],
    "qa": [("debian-faq", DEBIAN_FAQ), ("python3.11-doc", PYDOC / "faq")],
    "multilingual": [("manpages-de", MAN / "de"), ("manpages-fr", MAN / "fr")],
}


# ----------------------------------------------------------------------------- user sources


def _expand(path: str, where: str, suffixes: tuple[str, ...] = ()) -> list[Path]:
    """The files a user source names: a file, a directory (recursively) or a glob."""
    if any(ch in path for ch in "*?["):
        files = [Path(p) for p in sorted(glob.glob(path, recursive=True)) if Path(p).is_file()]
    elif Path(path).is_dir():
        files = [p for p in sorted(Path(path).rglob("*")) if p.is_file() and not p.name.startswith(".")
                 and (not suffixes or p.name.endswith(suffixes))]
    else:
        files = [Path(path)] if Path(path).is_file() else []
    if not files:
        raise ShearError(f"{where}={path!r}: no such file, directory or glob match "
                         "(relative paths start at the repository root)")
    return files


def read_user_source(source: dict, i: int) -> list[dict]:
    """Documents of one `corpus.user_sources[i]` entry (keys as in shear.config.UserSource).

    text: one document per file (a file longer than DOC_CHARS is cut at paragraph ends);
    jsonl / parquet: one document per row, from `text_field`; hf: a dataset saved with
    `save_to_disk`, or a dataset name/script that `datasets.load_dataset` finds offline.
    """
    where = f"corpus.user_sources[{i}]"
    fmt, path, field, lic = source["format"], source["path"], source.get("text_field", "text"), source.get("license", "unknown")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", source["domain"]):
        raise ShearError(f"{where}.domain={source['domain']!r} is not a valid name; use letters, digits, _ . -")
    texts: list[tuple[str, str]] = []  # (text, title)
    if fmt == "text":
        for f in _expand(path, f"{where}.path"):
            for k, chunk in enumerate(split_long(f.read_text(encoding="utf-8", errors="replace"))):
                texts.append((chunk, f"{f.name} ({k + 1})"))
    elif fmt == "jsonl":
        for f in _expand(path, f"{where}.path", (".jsonl", ".json")):
            for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise ShearError(f"{where}.path: {f}:{n} is not valid JSON") from None
                texts.append((_field(row, field, f"{where}.text_field", f"{f}:{n}"), f"{f.name}:{n}"))
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        for f in _expand(path, f"{where}.path", (".parquet",)):
            try:
                table = pq.read_table(f)
            except Exception as e:  # pyarrow raises several types for a bad file
                raise ShearError(f"{where}.path: {f} is not a readable Parquet file ({type(e).__name__})") from None
            if field not in table.column_names:
                raise ShearError(f"{where}.text_field={field!r}: {f} has no such column; "
                                 f"columns: {', '.join(table.column_names)}")
            for n, value in enumerate(table.column(field).to_pylist()):
                texts.append((_field({field: value}, field, f"{where}.text_field", f"{f} row {n}"), f"{f.name}:{n}"))
    elif fmt == "hf":
        dataset = _load_hf(path, source.get("split", "train"), where)
        if field not in dataset.column_names:
            raise ShearError(f"{where}.text_field={field!r}: dataset {path} has no such column; "
                             f"columns: {', '.join(dataset.column_names)}")
        for n, value in enumerate(dataset[field]):
            texts.append((_field({field: value}, field, f"{where}.text_field", f"{path} row {n}"), f"{path}:{n}"))
    else:
        raise ShearError(f"{where}.format={fmt!r} is not valid; choose one of text, jsonl, parquet, hf")
    return [doc(text, path, lic, title) for text, title in texts if text]


def _field(row, field: str, where: str, at: str) -> str:
    """The text field of one row, or a one-line error naming the key and the row."""
    if not isinstance(row, dict) or field not in row:
        fields = ", ".join(row) if isinstance(row, dict) else type(row).__name__
        raise ShearError(f"{where}={field!r}: {at} has no such field; fields there: {fields}")
    value = row[field]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ShearError(f"{where}={field!r}: {at} holds a {type(value).__name__}, not text")
    return value


def _load_hf(path: str, split: str, where: str):
    """A local Hugging Face dataset split: a `save_to_disk` folder, else `load_dataset` offline."""
    import datasets

    try:
        if (Path(path) / "dataset_dict.json").is_file() or (Path(path) / "state.json").is_file():
            loaded = datasets.load_from_disk(path)
        else:
            loaded = datasets.load_dataset(path, split=split)
    except Exception as e:  # datasets raises many types; the user needs one line
        first = str(e).strip().split("\n")[0][:200]
        raise ShearError(f"{where}.path={path!r}: not a local Hugging Face dataset ({type(e).__name__}: {first})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ShearError(f"{where}.split={split!r}: dataset {path} has splits {', '.join(loaded)}")
        loaded = loaded[split]
    return loaded
