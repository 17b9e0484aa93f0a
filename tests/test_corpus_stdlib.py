"""shear/corpus/stdlib.py: the Python standard library as the code domain."""
from __future__ import annotations

import pytest

from shear.corpus.stdlib import read_stdlib_code, stdlib_root
from shear.corpus.text import DOC_CHARS
from shear.errors import ShearError


def test_stdlib_code_reader(tmp_path):
    docs = read_stdlib_code(stdlib_root() / "json")
    titles = {d["title"].split(" (")[0] for d in docs}
    assert {"decoder.py", "encoder.py", "__init__.py"} <= titles
    assert all(d["source"] == "python-stdlib" and d["license"] == "PSF-2.0" for d in docs)
    assert all(len(d["text"]) <= 2 * DOC_CHARS for d in docs)
    # test suites, third-party packages and huge generated files are skipped
    for rel in ("pkg/mod.py", "pkg/tests/test_mod.py", "site-packages/x.py", "pkg/big.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n" * (50_000 if "big" in rel else 20))
    assert [d["title"] for d in read_stdlib_code(tmp_path)] == ["pkg/mod.py (1)"]


def test_source_encoding_is_the_declared_one(tmp_path):
    (tmp_path / "declared.py").write_bytes("# -*- coding: latin-1 -*-\nname = 'Andr\u00e9'\n".encode("latin-1"))
    assert read_stdlib_code(tmp_path)[0]["text"] == "# -*- coding: latin-1 -*-\nname = 'Andr\u00e9'"
    (tmp_path / "undeclared.py").write_bytes("name = 'Andr\u00e9'\n".encode("latin-1"))  # PEP 263: UTF-8
    with pytest.raises(ShearError, match=r"undeclared.py: not valid utf-8 at byte 12 \(0xe9\); the Python inst"):
        read_stdlib_code(tmp_path)
