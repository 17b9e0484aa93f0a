"""Corpus readers, user sources, cleaning/dedup/cap/held-out selection and the corpus stage.

No Debian package is needed: the tests write small files in each source's format
(an R lazy-load database, a dictd dictionary, a man page, ...) or use the Python stdlib.
"""
from __future__ import annotations

import gzip
import json
import shutil
import struct
import sysconfig
import zlib
from pathlib import Path

import pytest

from shear import corpus
from shear.config import CorpusParams, Params, UserSource
from shear.errors import ShearError

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def texts(docs):
    return [d["text"] for d in docs]


# ----------------------------------------------------------------------------- helpers


def test_split_long_keeps_paragraphs_and_bounds_size():
    paras = [f"paragraph {i} " + " ".join(["word"] * 150) for i in range(20)]  # ~760 chars each
    chunks = corpus.split_long("\n\n".join(paras), 4000)
    assert all(len(c) <= 4000 for c in chunks) and len(chunks) >= 4
    assert [p for c in chunks for p in c.split("\n\n")] == paras  # nothing lost or cut inside a paragraph
    one_line = corpus.split_long("x" * 9000, 4000)
    assert "".join(one_line) == "x" * 9000 and max(map(len, one_line)) <= 4000


def test_normalise():
    assert corpus.normalise("a \r\nb\xa0c\x00\n\n\n\n  d  \n") == "a\nb c\n\n  d"


# ----------------------------------------------------------------------------- built-in readers


def test_stdlib_code_reader(tmp_path):
    docs = corpus.read_stdlib_code(STDLIB / "json")
    titles = {d["title"].split(" (")[0] for d in docs}
    assert {"decoder.py", "encoder.py", "__init__.py"} <= titles
    assert all(d["source"] == "python-stdlib" and d["license"] == "PSF-2.0" for d in docs)
    assert all(len(d["text"]) <= 2 * corpus.DOC_CHARS for d in docs)
    # test suites, third-party packages and huge generated files are skipped
    for rel in ("pkg/mod.py", "pkg/tests/test_mod.py", "site-packages/x.py", "pkg/big.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n" * (50_000 if "big" in rel else 20))
    assert [d["title"] for d in corpus.read_stdlib_code(tmp_path)] == ["pkg/mod.py (1)"]


def _r_int(*values):
    return b"".join(struct.pack(">i", v) for v in values)


def _r_chars(s):
    b = s.encode()
    return _r_int(9 | (8 << 12), len(b)) + b  # CHARSXP, UTF-8


def _r_strings(values):
    return _r_int(16, len(values)) + b"".join(_r_chars(v) for v in values)  # STRSXP


def _r_named_list(items):
    """VECSXP with a names attribute (pairlist: LISTSXP with tag `names`, then NILVALUE)."""
    body = _r_int(19 | (1 << 9), len(items)) + b"".join(v for _, v in items)
    return body + _r_int(2 | (1 << 10), 1) + _r_chars("names") + _r_strings([k for k, _ in items]) + _r_int(254)


def _r_serialize(obj):
    return b"X\n" + _r_int(2, 0x040200, 0x020300) + obj  # XDR, format version 2


def write_rdata(root: Path, books: dict[str, list[str]]) -> None:
    """An R package's data/Rdata.rdb + Rdata.rdx holding character vectors."""
    blob, variables = b"", []
    for name, lines in books.items():
        record = _r_serialize(_r_strings(lines))
        packed = struct.pack(">I", len(record)) + zlib.compress(record)
        variables.append((name, _r_int(13, 2, len(blob), len(packed))))  # INTSXP (offset, length)
        blob += packed
    index = _r_named_list([("variables", _r_named_list(variables)), ("references", _r_int(19, 0)),
                           ("compressed", _r_int(10, 1, 1))])
    root.mkdir(parents=True, exist_ok=True)
    (root / "Rdata.rdb").write_bytes(blob)
    (root / "Rdata.rdx").write_bytes(gzip.compress(_r_serialize(index)))


def test_books_from_r_lazyload(tmp_path):
    para = ["It is a truth universally acknowledged, that a single man in possession",
            "of a good fortune, must be in want of a wife.", ""]
    lines = ["PERSUASION", "", "by Jane Austen", "", "VOLUME I", "", "CHAPTER I", ""] + para * 60 \
        + ["CHAPTER II", ""] + para * 2 + ["VOLUME II", "CHAPTER I", ""] + para
    write_rdata(tmp_path, {"persuasion": lines, "emma": ["Chapter 1", "", "Emma Woodhouse, handsome."]})
    objects = corpus.read_r_lazyload(tmp_path / "Rdata.rdb", tmp_path / "Rdata.rdx")
    assert list(objects["persuasion"]) == lines
    docs = corpus.read_books(tmp_path)
    titles = [d["title"] for d in docs]
    assert titles[0] == "Emma, Chapter 1 (1)" and docs[0]["text"] == "Emma Woodhouse, handsome."
    assert "Persuasion, Volume I, Chapter I (2)" in titles and titles[-1] == "Persuasion, Volume II, Chapter I (1)"
    first = docs[1]["text"].split("\n\n")
    assert first[0] == " ".join(para[:2]) and len(docs[1]["text"]) <= corpus.DOC_CHARS
    assert not any("by Jane Austen" in d["text"] for d in docs)  # the title page is skipped


@pytest.mark.skipif(not (corpus.JANEAUSTENR / "Rdata.rdb").exists(), reason="r-cran-janeaustenr not installed")
def test_real_janeaustenr():
    objects = corpus.read_r_lazyload(corpus.JANEAUSTENR / "Rdata.rdb", corpus.JANEAUSTENR / "Rdata.rdx",
                                     names=["persuasion"])
    assert list(objects) == ["persuasion"]
    assert "Sir Walter Elliot, of Kellynch Hall" in " ".join(objects["persuasion"][:40])


def _b64(n: int) -> str:
    digits = ""
    while True:
        digits = corpus._B64[n % 64] + digits
        n //= 64
        if n == 0:
            return digits


def test_dictd_foldoc(tmp_path):
    entries = [
        ("flag", "flag\n\n   1. <programming> A variable or quantity that can take on one\n"
                 "   of two values; see also {hidden flag}.\n\n   [{Jargon File}]\n\n   (1998-05-02)\n\n"),
        ("exclamation mark", "exclamation mark\n!\nbang\n\n   <character> The character \"!\" with {ASCII}\n"
                             "   code 33, also called bang.\n\n   (1998-09-17)\n\n"),
        ("tiny", "tiny\n\n   {flag}.\n\n"),
    ]
    data, index = b"", ["00-database-info\tA\tB"]
    for term, raw in entries:
        b = raw.encode()
        index.append(f"{term}\t{_b64(len(data))}\t{_b64(len(b))}")
        if term == "exclamation mark":
            index.append(f"!\t{_b64(len(data))}\t{_b64(len(b))}")  # an alias: same entry
        data += b
    (tmp_path / "foldoc.index").write_text("\n".join(index) + "\n")
    (tmp_path / "foldoc.dict.dz").write_bytes(gzip.compress(data))
    assert [h for h, _ in corpus.read_dictd(tmp_path / "foldoc.index", tmp_path / "foldoc.dict.dz")] == \
        ["flag", "exclamation mark", "tiny"]
    docs = corpus.read_foldoc(tmp_path)
    assert [d["title"] for d in docs] == ["flag", "exclamation mark"]  # "tiny" is a bare cross-reference
    assert docs[0]["text"] == ("flag\n\n1. A variable or quantity that can take on one of two values; "
                               "see also hidden flag.\n\n[Jargon File]")
    assert docs[1]["text"] == 'exclamation mark\n\nThe character "!" with ASCII code 33, also called bang.'


def test_roff_to_text():
    page = "\n".join([
        '.\\" a comment', ".TH LS 1 2022", ".de XX", "junk inside a macro", "..", ".SH BEZEICHNUNG",
        "ls \\- Verzeichnisinhalte auflisten", '.SH "SIEHE AUCH"', ".PP", "Die \\fBOptionen\\fP und \\fI\\,DATEI\\/\\fR",
        "sind \\(lqwichtig\\(rq \\[u00E9]t\\['e]\\e.", ".TP", ".BR ls (1),", ".IP \\(bu 3", "Punkt eins",
        ".nr XY 3", ".if n .ds Aq '", "Text\\(em weiter \\\" trailing comment", ".br", "zweite Zeile",
        ".TS", "allbox;", "l l.", "Name\tWert", "_", "a\tT{", "eins", "T}", ".TE",
    ])
    text = corpus.normalise(corpus.roff_to_text(page))
    assert text == ("BEZEICHNUNG\n\nls - Verzeichnisinhalte auflisten\n\nSIEHE AUCH\n\n"
                    "Die Optionen und DATEI\nsind “wichtig” été\\.\n\nls(1),\n\n•\nPunkt eins\nText— weiter\n"
                    "zweite Zeile\nName\tWert\na\neins")


def test_man_page_reader(tmp_path):
    page = ".TH X 1\n.SH NOM\nx \\- un programme\n.SH DESCRIPTION\nIl fait des choses.\n.SH TRADUCTION\nMerci.\n"
    (tmp_path / "fr" / "man1").mkdir(parents=True)
    (tmp_path / "fr" / "man1" / "x.1.gz").write_bytes(gzip.compress(page.encode()))
    (tmp_path / "fr" / "man1" / "y.1.gz").symlink_to("x.1.gz")
    docs = corpus.read_man_pages(tmp_path, ("fr",))
    assert [(d["title"], d["text"], d["source"]) for d in docs] == [
        ("x(1) [fr] (1)", "NOM\n\nx - un programme\n\nDESCRIPTION\n\nIl fait des choses.", "manpages-fr")]


def test_faq_and_pdf_splitters():
    faq = ("Table of Contents\n\n1. Basics\n    1.1. What?\n\nChapter 1. Basics\n\n    Intro.\n\n"
           "1.1.\xa0What is a long\nquestion?\n\n    The answer\n    continues.\n\n"
           "---------------------------------------------------------------------\n\n    ^[1] a footnote\n\n"
           "1.2. Empty?\n\n")
    assert corpus.split_debian_faq(faq) == [("Chapter 1. Basics", "Intro."),
                                           ("1.1. What is a long question?", "The answer\ncontinues.")]
    rst = "=====\nTitle\n=====\n\nSection\n=======\n\nWhy?\n----\n\nBecause.\n\nHow?\n----\n\nLike so.\n"
    assert corpus.split_rst_sections(rst) == [("Why?", "Because."), ("How?", "Like so.")]
    pages = ["Title page", "Contents\n1 Intro . . . . 1", "Chapter 1\nIntroduction\nThe ﬁrst page of the intro-\nduction.",
             "2 CHAPTER 1. INTRODUCTION\nSecond page.", "Bibliography\n[1] A book.", "Index\nfoo, 3"]
    assert corpus.pdf_sections(pages) == [
        ("Chapter 1", "Chapter 1\nIntroduction\nThe first page of the introduction.\nSecond page.")]


@pytest.mark.parametrize("reader, kwargs, package", [
    (corpus.read_books, {"root": "/nonexistent/janeaustenr"}, "r-cran-janeaustenr"),
    (corpus.read_foldoc, {"root": "/nonexistent/dictd"}, "dict-foldoc"),
    (corpus.read_python_docs, {"root": "/nonexistent/_sources"}, "python3.11-doc"),
    (corpus.read_derivations, {"pdf": "/nonexistent/derivations.pdf"}, "derivations"),
    (corpus.read_qa, {"debian_faq": "/nonexistent/faq.txt.gz"}, "debian-faq"),
    (corpus.read_man_pages, {"root": "/nonexistent/man"}, "manpages-de"),
])
def test_missing_package_is_one_line(reader, kwargs, package):
    with pytest.raises(ShearError) as e:
        reader(**kwargs)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("corpus.domains: '") and f"Debian package {package} (/nonexistent/" in msg
    assert msg.endswith("not found); run `make setup` or remove it from corpus.domains")


def test_collect_checks_every_package_first(monkeypatch):
    monkeypatch.setitem(corpus.PACKAGES, "math", [("derivations", Path("/nonexistent/derivations.pdf"))])
    monkeypatch.setitem(corpus.READERS, "code", lambda: pytest.fail("read before the check"))
    with pytest.raises(ShearError, match=r"^corpus.domains: 'math' needs Debian package derivations"):
        corpus.collect_documents(["code", "math"], [])


# ----------------------------------------------------------------------------- user sources


def source(path, fmt="text", **kw):
    return {"domain": "mine", "path": str(path), "format": fmt, "text_field": "text", "license": "CC-BY-4.0",
            "split": "train", **kw}


def test_user_text_files(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_text("first file\n")
    (tmp_path / "d" / "sub" / "b.txt").write_text("second file\n")
    (tmp_path / "d" / "long.md").write_text("\n\n".join(["para " * 200] * 10))
    by_glob = corpus.read_user_source(source(tmp_path / "d" / "*.txt"), 0)
    assert texts(by_glob) == ["first file"] and by_glob[0]["license"] == "CC-BY-4.0"
    by_dir = corpus.read_user_source(source(tmp_path / "d"), 0)
    assert len(by_dir) > 3 and "second file" in texts(by_dir)  # recursive; the long file is cut
    with pytest.raises(ShearError, match=r"^corpus.user_sources\[2\].path='.*nope': no such file"):
        corpus.read_user_source(source(tmp_path / "nope"), 2)


def test_user_jsonl(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_text('{"text": "row one", "id": 1}\n\n{"text": "row two", "id": 2}\n')
    assert texts(corpus.read_user_source(source(f, "jsonl"), 0)) == ["row one", "row two"]
    with pytest.raises(ShearError, match=r"^corpus.user_sources\[1\].text_field='body': .*rows.jsonl:1 has no such field; fields there: text, id$"):
        corpus.read_user_source(source(f, "jsonl", text_field="body"), 1)


def test_user_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["alpha", "beta", None], "n": [1, 2, 3]}), tmp_path / "t.parquet")
    assert texts(corpus.read_user_source(source(tmp_path, "parquet", text_field="content"), 0)) == ["alpha", "beta"]
    with pytest.raises(ShearError, match=r"text_field='text': .*t.parquet has no such column; columns: content, n$"):
        corpus.read_user_source(source(tmp_path / "t.parquet", "parquet"), 0)


def test_user_hf_dataset_saved_to_disk(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["hf one", "hf two"]}),
                          "test": datasets.Dataset.from_dict({"text": ["hf three"]})}).save_to_disk(tmp_path / "dd")
    datasets.Dataset.from_dict({"body": ["solo"]}).save_to_disk(tmp_path / "ds")
    assert texts(corpus.read_user_source(source(tmp_path / "dd", "hf"), 0)) == ["hf one", "hf two"]
    assert texts(corpus.read_user_source(source(tmp_path / "dd", "hf", split="test"), 0)) == ["hf three"]
    assert texts(corpus.read_user_source(source(tmp_path / "ds", "hf", text_field="body"), 0)) == ["solo"]
    with pytest.raises(ShearError, match=r"^corpus.user_sources\[0\].split='dev': .* has splits train, test$"):
        corpus.read_user_source(source(tmp_path / "dd", "hf", split="dev"), 0)
    with pytest.raises(ShearError, match=r"^corpus.user_sources\[0\].path='.*missing': not a local Hugging Face dataset"):
        corpus.read_user_source(source(tmp_path / "missing", "hf"), 0)


# ----------------------------------------------------------------------------- selection


def make_docs(prefix, n, size=300):
    return [corpus.doc(f"{prefix} {i} " + "lorem ipsum " * (size // 12), prefix, "MIT") for i in range(n)]


def test_dedup_short_and_first_domain_wins():
    shared = corpus.doc("the very same text " * 10, "x", "MIT")
    by_domain = {"a": make_docs("a", 10) + [shared, {**shared, "text": shared["text"] + "  \n"}],
                 "b": [dict(shared)] + make_docs("b", 10) + [corpus.doc("short", "b", "MIT")]}
    raw, held, report = corpus.select_documents(by_domain, 10**9, 64, 0, seed=0)
    assert shared["text"].strip() in texts(raw["a"]) and shared["text"].strip() not in texts(raw["b"])
    assert report["domains"]["a"]["dropped_duplicates"] == 1  # equal after whitespace normalisation
    assert report["domains"]["b"]["dropped_duplicates"] == 1 and report["domains"]["b"]["dropped_short"] == 1
    assert report["total"]["documents"] == 21


def test_cap_and_heldout_are_disjoint_and_seeded():
    by_domain = {"a": make_docs("a", 100), "b": make_docs("b", 12)}
    raw, held, report = corpus.select_documents(by_domain, 6000, 64, 10, seed=0)
    a = report["domains"]["a"]
    assert a["heldout_documents"] == 10 and 0 < a["characters"] <= 6000 and a["documents"] == len(raw["a"])
    assert a["documents"] + a["heldout_documents"] + a["dropped_by_cap"] == 100
    assert not set(texts(raw["a"])) & set(texts(held["a"]))
    assert len(held["b"]) == 2  # at most a fifth of a small domain is held out
    again = corpus.select_documents(by_domain, 6000, 64, 10, seed=0)
    other = corpus.select_documents(by_domain, 6000, 64, 10, seed=1)
    assert again[0] == raw and again[1] == held and other[1]["a"] != held["a"]
    assert texts(raw["a"]) == sorted(texts(raw["a"]), key=lambda t: int(t.split()[1]))  # reading order kept


def test_empty_domain_is_an_error():
    with pytest.raises(ShearError, match=r"^corpus: domain 'a' has no document of at least 64 characters"):
        corpus.select_documents({"a": [corpus.doc("tiny", "x", "MIT")]}, 100, 64, 0, 0)


# ----------------------------------------------------------------------------- the stage


def test_stage_writes_same_bytes(tmp_path, monkeypatch):
    from stages import corpus as stage

    src = tmp_path / "src"
    src.mkdir()
    for p in sorted((STDLIB / "json").glob("*.py")) + sorted((STDLIB / "email").glob("*.py"))[:12]:
        shutil.copy(p, src / f"{p.parent.name}_{p.stem}.txt")
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"text": f"row {i} " + "words " * 30}) + "\n" for i in range(40)))
    params = Params(corpus=CorpusParams(domains=[], heldout_docs=5, max_chars_per_domain=100_000, user_sources=[
        UserSource(domain="prose", path="src/*.txt", license="PSF-2.0"),
        UserSource(domain="rows", path="rows.jsonl", format="jsonl")]))
    monkeypatch.chdir(tmp_path)
    outputs = []
    for _ in range(2):
        stage.main(params, None)
        outputs.append({p.relative_to(tmp_path).as_posix(): p.read_bytes()
                        for p in sorted((tmp_path / "data").rglob("*.jsonl")) + [tmp_path / "reports/corpus.json"]})
    assert outputs[0] == outputs[1]
    assert set(outputs[0]) == {"data/raw/prose.jsonl", "data/raw/rows.jsonl", "data/heldout/prose.jsonl",
                               "data/heldout/rows.jsonl", "reports/corpus.json"}
    report = json.loads(outputs[0]["reports/corpus.json"])
    assert report["domains"]["rows"]["heldout_documents"] == 5 and report["domains"]["rows"]["documents"] == 35
    assert report["domains"]["prose"]["sources"] == ["src/*.txt"] and report["domains"]["prose"]["license"] == "PSF-2.0"
    raw = [json.loads(line) for line in outputs[0]["data/raw/prose.jsonl"].decode().splitlines()]
    held = [json.loads(line) for line in outputs[0]["data/heldout/prose.jsonl"].decode().splitlines()]
    assert set(raw[0]) == {"text", "source", "license", "title"}
    assert not {d["text"] for d in raw} & {d["text"] for d in held}
    assert sum(len(d["text"]) for d in raw) == report["domains"]["prose"]["characters"] <= 100_000
