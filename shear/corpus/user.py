"""User sources (`corpus.user_sources`): text files, JSONL, Parquet or a local Hugging
Face dataset, added to a domain of their own or to a built-in one; the files each
source names, and the check that DVC tracks them (so that editing one re-runs corpus)."""
from __future__ import annotations

import codecs
import glob
import json
import re
from pathlib import Path, PurePosixPath
from typing import Callable

from shear.corpus.text import doc, read_text, split_long
from shear.errors import ShearError

_GLOB = re.compile(r"[*?[]")


def expand(path: str, where: str, suffixes: tuple[str, ...] = ()) -> list[Path]:
    """The files a user source names: a file, a directory (recursively) or a glob."""
    if _GLOB.search(path):
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


def check_source(source: dict, i: int) -> None:
    """The one-line error for a user source whose domain or encoding is not valid."""
    where = f"corpus.user_sources[{i}]"
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", source["domain"]):
        raise ShearError(f"{where}.domain={source['domain']!r} is not a valid name; use letters, digits, _ . -")
    encoding = source.get("encoding", "utf-8")
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise ShearError(f"{where}.encoding={encoding!r} is not a known text encoding; "
                         "e.g. utf-8, latin-1, cp1252") from None
    if source["format"] in ("parquet", "hf") and codecs.lookup(encoding).name != "utf-8":
        raise ShearError(f"{where}.encoding={encoding!r}: {source['format']} sources hold text already "
                         "decoded; encoding applies to format text and jsonl only")


def read_user_source(source: dict, i: int) -> list[dict]:
    """Documents of one `corpus.user_sources[i]` entry (keys as in shear.config.UserSource).

    text: one document per file (a file longer than DOC_CHARS is cut at paragraph ends);
    jsonl / parquet: one document per row, from `text_field`; hf: a dataset saved with
    `save_to_disk`, or a dataset name/script that `datasets.load_dataset` finds offline.
    Text and JSONL files are decoded strictly in `encoding` (default UTF-8).
    """
    check_source(source, i)
    where = f"corpus.user_sources[{i}]"
    fmt, path, field = source["format"], source["path"], source.get("text_field", "text")
    lic, encoding = source.get("license", "unknown"), source.get("encoding", "utf-8")
    fix = f"set {where}.encoding to the file's encoding (e.g. latin-1, cp1252) or convert it to UTF-8"
    texts: list[tuple[str, str]] = []  # (text, title)
    if fmt == "text":
        for f in expand(path, f"{where}.path"):
            for k, chunk in enumerate(split_long(read_text(f, encoding, fix))):
                texts.append((chunk, f"{f.name} ({k + 1})"))
    elif fmt == "jsonl":
        for f in expand(path, f"{where}.path", (".jsonl", ".json")):
            for n, line in enumerate(read_text(f, encoding, fix).splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise ShearError(f"{where}.path: {f}:{n} is not valid JSON") from None
                texts.append((_field(row, field, f"{where}.text_field", f"{f}:{n}"), f"{f.name}:{n}"))
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        for f in expand(path, f"{where}.path", (".parquet",)):
            try:
                table = pq.read_table(f)
            except Exception as e:  # pyarrow raises several types for a bad file
                raise ShearError(f"{where}.path: {f} is not a readable Parquet file ({type(e).__name__})") from None
            if field not in table.column_names:
                raise ShearError(f"{where}.text_field={field!r}: {f} has no such column; "
                                 f"columns: {', '.join(table.column_names)}")
            for n, value in enumerate(_utf8_column(lambda: table.column(field).to_pylist(),  # noqa: B023 (called at once)
                                                  f"{where}.path", f)):
                texts.append((_field({field: value}, field, f"{where}.text_field", f"{f} row {n}"), f"{f.name}:{n}"))
    elif fmt == "hf":
        dataset = _load_hf(path, source.get("split", "train"), where)
        if field not in dataset.column_names:
            raise ShearError(f"{where}.text_field={field!r}: dataset {path} has no such column; "
                             f"columns: {', '.join(dataset.column_names)}")
        for n, value in enumerate(_utf8_column(lambda: dataset[field], f"{where}.path", path)):
            texts.append((_field({field: value}, field, f"{where}.text_field", f"{path} row {n}"), f"{path}:{n}"))
    else:
        raise ShearError(f"{where}.format={fmt!r} is not valid; choose one of text, jsonl, parquet, hf")
    return [doc(text, path, lic, title) for text, title in texts if text]


def _utf8_column(read: Callable[[], list], where: str, at: str | Path) -> list:
    """The values `read()` returns from an Arrow string column; Arrow strings must be
    UTF-8, and a column that holds other bytes is one line, not a UnicodeDecodeError."""
    try:
        return read()
    except UnicodeDecodeError as e:
        raise ShearError(f"{where}: {at} holds text that is not valid UTF-8 ({e.reason}); "
                         "write it again with UTF-8 strings") from None


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
        raise ShearError(f"{where}.path={path!r}: not a local Hugging Face dataset "
                         f"({type(e).__name__}: {first})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ShearError(f"{where}.split={split!r}: dataset {path} has splits {', '.join(loaded)}")
        loaded = loaded[split]
    return loaded


# ----------------------------------------------------------------------------- staleness


def tracked_root(source: dict) -> str | None:
    """The path DVC must track for a source to be up to date: the file or directory it
    names, or the fixed directory a glob starts from ("texts/*.txt" -> "texts"); None for
    an `hf` dataset given by name (the Hugging Face cache versions it, not the repository)."""
    path = source["path"]
    if source["format"] == "hf" and not Path(path).exists():
        return None
    parts = PurePosixPath(path).parts
    first_glob = next((k for k, part in enumerate(parts) if _GLOB.search(part)), len(parts))
    return PurePosixPath(*parts[:first_glob]).as_posix()  # "." when the glob starts at the root


def untracked_sources(sources: list[dict], deps: list[str]) -> list[tuple[int, str]]:
    """(index, path to add) of every user source that no dependency in `deps` (the corpus
    stage's, from dvc.yaml) covers: its files could change without DVC re-running corpus."""
    covered = [PurePosixPath(d.rstrip("/")) for d in deps]
    missing = []
    for i, source in enumerate(sources):
        root = tracked_root(source)
        if root is not None and not any(PurePosixPath(root) == d or d in PurePosixPath(root).parents
                                        for d in covered):
            missing.append((i, root))
    return missing
