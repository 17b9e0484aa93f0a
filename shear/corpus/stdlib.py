"""code: the .py files of the Python standard library of the running interpreter (so the
domain depends on the Python version; reports/corpus.json records which). Each file is
decoded strictly in its declared source encoding (PEP 263; UTF-8 when none is declared)."""
from __future__ import annotations

import io
import sysconfig
import tokenize
from pathlib import Path

from tqdm import tqdm

from shear.corpus.text import decode, doc, read_text, split_long
from shear.errors import ShearError

SKIP_CODE_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "pydoc_data", "__pycache__"}
MAX_CODE_BYTES = 256_000  # larger files are generated tables, not code worth learning from
FIX = "the Python installation is damaged; reinstall it or remove 'code' from corpus.domains"


def stdlib_root() -> Path:
    """The standard library directory of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def read_python_source(path: Path) -> str:
    """A .py file's text in the encoding its coding cookie declares (PEP 263), strictly."""
    data = path.read_bytes()
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
    except SyntaxError as e:  # undecodable first lines, or an unknown or contradictory declaration
        decode(data, path, "utf-8", FIX)  # the error with the byte offset, when that is the cause
        raise ShearError(f"{path}: {e.msg}; {FIX}") from None
    return read_text(path, encoding, FIX, data)


def read_stdlib_code(root: str | Path | None = None) -> list[dict]:
    """The .py files of the Python standard library (default: the running interpreter's),
    without installed third-party packages, test suites and very large generated files."""
    root = Path(root or stdlib_root())
    if not root.is_dir():
        raise ShearError(f"corpus.domains: 'code' reads the Python standard library, but {root} is not a directory")
    docs = []
    files = [p for p in sorted(root.rglob("*.py")) if not SKIP_CODE_DIRS & set(p.relative_to(root).parts[:-1])]
    for path in tqdm(files, desc="corpus code", unit="file"):
        if path.stat().st_size > MAX_CODE_BYTES:
            continue
        rel = path.relative_to(root).as_posix()
        for k, text in enumerate(split_long(read_python_source(path))):
            docs.append(doc(text, "python-stdlib", "PSF-2.0", f"{rel} ({k + 1})"))
    return docs
