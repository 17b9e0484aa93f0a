"""shear/corpus/select.py: cleaning, dedup, caps, held-out documents, JSONL."""
from __future__ import annotations

import hashlib

import pytest

from shear.corpus.select import select_documents, write_jsonl
from shear.corpus.text import doc
from shear.errors import ShearError


def texts(docs):
    return [d["text"] for d in docs]


def make_docs(prefix, n, size=300):
    return [doc(f"{prefix} {i} " + "lorem ipsum " * (size // 12), prefix, "MIT") for i in range(n)]


def test_dedup_short_and_first_domain_wins():
    shared = doc("the very same text " * 10, "x", "MIT")
    by_domain = {"a": make_docs("a", 10) + [shared, {**shared, "text": shared["text"] + "  \n"}],
                 "b": [dict(shared)] + make_docs("b", 10) + [doc("short", "b", "MIT")]}
    raw, held, report = select_documents(by_domain, 10**9, 64, 0, seed=0)
    assert shared["text"].strip() in texts(raw["a"]) and shared["text"].strip() not in texts(raw["b"])
    assert report["domains"]["a"]["dropped_duplicates"] == 1  # equal after whitespace normalisation
    assert report["domains"]["b"]["dropped_duplicates"] == 1 and report["domains"]["b"]["dropped_short"] == 1
    assert report["total"]["documents"] == 21


def test_cap_and_heldout_are_disjoint_and_seeded():
    by_domain = {"a": make_docs("a", 100), "b": make_docs("b", 12)}
    raw, held, report = select_documents(by_domain, 6000, 64, 10, seed=0)
    a = report["domains"]["a"]
    assert a["heldout_documents"] == 10 and 0 < a["characters"] <= 6000 and a["documents"] == len(raw["a"])
    assert a["documents"] + a["heldout_documents"] + a["dropped_by_cap"] == 100
    assert not set(texts(raw["a"])) & set(texts(held["a"]))
    assert len(held["b"]) == 2  # at most a fifth of a small domain is held out
    again = select_documents(by_domain, 6000, 64, 10, seed=0)
    other = select_documents(by_domain, 6000, 64, 10, seed=1)
    assert again[0] == raw and again[1] == held and other[1]["a"] != held["a"]
    assert texts(raw["a"]) == sorted(texts(raw["a"]), key=lambda t: int(t.split()[1]))  # reading order kept


def test_empty_domain_is_an_error():
    with pytest.raises(ShearError, match=r"^corpus: domain 'a' has no document of at least 64 characters"):
        select_documents({"a": [doc("tiny", "x", "MIT")]}, 100, 64, 0, 0)


def test_write_jsonl_returns_the_digest_of_its_bytes(tmp_path):
    docs = [doc("caf\u00e9 \"quoted\"", "x", "MIT", "t"), doc("two", "x", "MIT")]
    digest = write_jsonl(tmp_path / "d.jsonl", docs)
    data = (tmp_path / "d.jsonl").read_bytes()
    assert data == ('{"text": "caf\u00e9 \\"quoted\\"", "source": "x", "license": "MIT", "title": "t"}\n'
                    '{"text": "two", "source": "x", "license": "MIT"}\n').encode()
    assert digest == hashlib.sha256(data).hexdigest()
