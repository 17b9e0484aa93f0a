"""shear/corpus/user.py: user sources in every format, their encodings, and what DVC must track."""
from __future__ import annotations

import pytest

from shear.corpus.user import read_user_source, tracked_root, untracked_sources
from shear.errors import ShearError


def texts(docs):
    return [d["text"] for d in docs]


def source(path, fmt="text", **kw):
    return {"domain": "mine", "path": str(path), "format": fmt, "text_field": "text", "license": "CC-BY-4.0",
            "split": "train", **kw}


def test_user_text_files(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_text("first file\n")
    (tmp_path / "d" / "sub" / "b.txt").write_text("second file\n")
    (tmp_path / "d" / "long.md").write_text("\n\n".join(["para " * 200] * 10))
    by_glob = read_user_source(source(tmp_path / "d" / "*.txt"), 0)
    assert texts(by_glob) == ["first file"] and by_glob[0]["license"] == "CC-BY-4.0"
    by_dir = read_user_source(source(tmp_path / "d"), 0)
    assert len(by_dir) > 3 and "second file" in texts(by_dir)  # recursive; the long file is cut
    with pytest.raises(ShearError, match=r"^corpus.user_sources\[2\].path='.*nope': no such file"):
        read_user_source(source(tmp_path / "nope"), 2)


def test_user_jsonl(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_text('{"text": "row one", "id": 1}\n\n{"text": "row two", "id": 2}\n')
    assert texts(read_user_source(source(f, "jsonl"), 0)) == ["row one", "row two"]
    with pytest.raises(ShearError, match=r"^corpus.user_sources\[1\].text_field='body': .*rows.jsonl:1 has no such "
                                         r"field; fields there: text, id$"):
        read_user_source(source(f, "jsonl", text_field="body"), 1)


def test_user_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["alpha", "beta", None], "n": [1, 2, 3]}), tmp_path / "t.parquet")
    assert texts(read_user_source(source(tmp_path, "parquet", text_field="content"), 0)) == ["alpha", "beta"]
    with pytest.raises(ShearError, match=r"text_field='text': .*t.parquet has no such column; columns: content, n$"):
        read_user_source(source(tmp_path / "t.parquet", "parquet"), 0)


def test_parquet_strings_not_utf8(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    not_utf8 = pa.array([b"fine", b"caf\xe9"], pa.binary()).view(pa.string())  # Arrow does not check on write
    pq.write_table(pa.table({"text": not_utf8}), tmp_path / "t.parquet")
    with pytest.raises(ShearError, match=r"^corpus.user_sources\[0\].path: .*t.parquet holds text that is not valid "
                                         r"UTF-8 \(unexpected end of data\); write it again with UTF-8 strings$"):
        read_user_source(source(tmp_path / "t.parquet", "parquet"), 0)


def test_user_hf_dataset_saved_to_disk(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["hf one", "hf two"]}),
                          "test": datasets.Dataset.from_dict({"text": ["hf three"]})}).save_to_disk(tmp_path / "dd")
    datasets.Dataset.from_dict({"body": ["solo"]}).save_to_disk(tmp_path / "ds")
    assert texts(read_user_source(source(tmp_path / "dd", "hf"), 0)) == ["hf one", "hf two"]
    assert texts(read_user_source(source(tmp_path / "dd", "hf", split="test"), 0)) == ["hf three"]
    assert texts(read_user_source(source(tmp_path / "ds", "hf", text_field="body"), 0)) == ["solo"]
    with pytest.raises(ShearError, match=r"^corpus.user_sources\[0\].split='dev': .* has splits train, test$"):
        read_user_source(source(tmp_path / "dd", "hf", split="dev"), 0)
    with pytest.raises(ShearError, match=r"^corpus.user_sources\[0\].path='.*missing': not a local Hugging Face"):
        read_user_source(source(tmp_path / "missing", "hf"), 0)


def test_encoding_option(tmp_path):
    (tmp_path / "a.txt").write_bytes("Gr\u00fc\u00dfe\n".encode("latin-1"))
    (tmp_path / "rows.jsonl").write_bytes('{"text": "K\u00f6ln"}\n'.encode("cp1252"))
    assert texts(read_user_source(source(tmp_path / "a.txt", encoding="latin-1"), 0)) == ["Gr\u00fc\u00dfe"]
    assert texts(read_user_source(source(tmp_path / "rows.jsonl", "jsonl", encoding="cp1252"), 0)) == ["K\u00f6ln"]
    with pytest.raises(ShearError, match=r"^corpus.user_sources\[3\].encoding='klingon' is not a known text encoding"):
        read_user_source(source(tmp_path / "a.txt", encoding="klingon"), 3)
    with pytest.raises(ShearError, match=r"^corpus.user_sources\[0\].encoding='latin-1': parquet sources hold text"):
        read_user_source(source(tmp_path, "parquet", encoding="latin-1"), 0)


@pytest.mark.parametrize("path, fmt, root", [
    ("texts/*.txt", "text", "texts"), ("texts/**/*.md", "text", "texts"), ("data/user/rows.jsonl", "jsonl", "data/user"
     "/rows.jsonl"), ("./notes", "text", "notes"), ("*.txt", "text", "."), ("/abs/dir/[ab].txt", "text", "/abs/dir"),
    ("no/such/hf_name", "hf", None),
])
def test_tracked_root(path, fmt, root):
    assert tracked_root(source(path, fmt)) == root


def test_untracked_sources():
    sources = [source("texts/*.txt"), source("corpus/extra/rows.jsonl", "jsonl"), source("more/a.txt")]
    assert untracked_sources(sources, ["stages/corpus.py", "texts/", "corpus"]) == [(2, "more/a.txt")]
    assert untracked_sources(sources, ["."]) == []
    assert untracked_sources(sources, ["texts/a.txt"]) == [(0, "texts"), (1, "corpus/extra/rows.jsonl"),
                                                          (2, "more/a.txt")]
