"""The built-in domains (which reader, which Debian packages), collecting every domain's
documents, and the provenance that pins what was read (for reports/corpus.json)."""
from __future__ import annotations

import hashlib
import platform

from shear.corpus import books, faq, foldoc, manpages, pdf, rst, stdlib
from shear.corpus.debian import DEBIAN_FAQ, DERIVATIONS, DICTD, JANEAUSTENR, MAN, PYDOC, installed_versions, require
from shear.corpus.user import expand, read_user_source, tracked_root

READERS = {
    "books": books.read_books,
    "encyclopedic": foldoc.read_foldoc,
    "docs": rst.read_python_docs,
    "code": stdlib.read_stdlib_code,
    "math": pdf.read_derivations,
    "qa": faq.read_qa,
    "multilingual": manpages.read_man_pages,
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


def provenance(domains: list[str], user_sources: list[dict]) -> dict:
    """What the corpus was read from, so that two corpora can be told apart: the exact
    version of every Debian package read (None: not installed), the Python whose standard
    library `code` reads, and the sha256 of every user file."""
    packages = sorted({package for domain in domains for package, _ in PACKAGES.get(domain, ())})
    out: dict = {"debian_packages": installed_versions(packages)}
    if "code" in domains:
        out["python"] = {"version": platform.python_version(), "implementation": platform.python_implementation(),
                         "stdlib": str(stdlib.stdlib_root())}
    out["user_sources"] = [{"path": source["path"], "files": _file_digests(source, i)}
                           for i, source in enumerate(user_sources)]
    return out


def _file_digests(source: dict, i: int) -> dict[str, str] | None:
    """{file: sha256} of a user source's files; None for a Hugging Face dataset given by name."""
    if tracked_root(source) is None:
        return None
    digests = {}
    for f in expand(source["path"], f"corpus.user_sources[{i}].path"):
        with open(f, "rb") as fh:
            digests[f.as_posix()] = hashlib.file_digest(fh, "sha256").hexdigest()
    return digests
