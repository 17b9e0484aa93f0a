"""The corpus as a whole: the domain table, provenance, the stage, its bad inputs, and
staleness under a real DVC repository. Each module of shear/corpus/ has its own
tests/test_corpus_<module>.py.

No Debian package is needed: the tests write small files in each source's format
or use the Python stdlib.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from shear.config import CorpusParams, Params, UserSource
from shear.corpus import sources
from shear.corpus.books import read_books
from shear.corpus.debian import installed_versions
from shear.corpus.faq import read_qa
from shear.corpus.foldoc import read_foldoc
from shear.corpus.manpages import read_man_pages
from shear.corpus.pdf import read_derivations
from shear.corpus.rst import read_python_docs
from shear.corpus.stdlib import stdlib_root
from shear.errors import ShearError
from tests.conftest import REPO

STDLIB = stdlib_root()


# ----------------------------------------------------------------------------- sources


@pytest.mark.parametrize("reader, kwargs, package", [
    (read_books, {"root": "/nonexistent/janeaustenr"}, "r-cran-janeaustenr"),
    (read_foldoc, {"root": "/nonexistent/dictd"}, "dict-foldoc"),
    (read_python_docs, {"root": "/nonexistent/_sources"}, "python3.11-doc"),
    (read_derivations, {"pdf": "/nonexistent/derivations.pdf"}, "derivations"),
    (read_qa, {"debian_faq": "/nonexistent/faq.txt.gz"}, "debian-faq"),
    (read_man_pages, {"root": "/nonexistent/man"}, "manpages-de"),
])
def test_missing_package_is_one_line(reader, kwargs, package):
    with pytest.raises(ShearError) as e:
        reader(**kwargs)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("corpus.domains: '") and f"Debian package {package} (/nonexistent/" in msg
    assert msg.endswith("not found); run `make setup` or remove it from corpus.domains")


def test_collect_checks_every_package_first(monkeypatch):
    monkeypatch.setitem(sources.PACKAGES, "math", [("derivations", Path("/nonexistent/derivations.pdf"))])
    monkeypatch.setitem(sources.READERS, "code", lambda: pytest.fail("read before the check"))
    with pytest.raises(ShearError, match=r"^corpus.domains: 'math' needs Debian package derivations"):
        sources.collect_documents(["code", "math"], [])


def test_provenance(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    user = [{"domain": "mine", "path": str(tmp_path / "*.txt"), "format": "text"},
            {"domain": "hub", "path": "some/hub_dataset", "format": "hf"}]
    p = sources.provenance(["code", "qa"], user)
    assert set(p["debian_packages"]) == {"debian-faq", "python3.11-doc"}
    assert p["python"] == {"version": platform.python_version(), "implementation": platform.python_implementation(),
                           "stdlib": str(STDLIB)}
    assert p["user_sources"] == [
        {"path": str(tmp_path / "*.txt"),
         "files": {(tmp_path / "a.txt").as_posix(): hashlib.sha256(b"alpha").hexdigest()}},
        {"path": "some/hub_dataset", "files": None}]
    assert "python" not in sources.provenance(["books"], [])


def test_installed_versions():
    versions = installed_versions(["surely-not-a-debian-package-x"])
    assert versions == {"surely-not-a-debian-package-x": None}
    if shutil.which("dpkg-query") and subprocess.run(["dpkg-query", "-W", "dpkg"], capture_output=True).returncode == 0:
        version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "dpkg"], capture_output=True, text=True).stdout
        assert installed_versions(["dpkg"]) == {"dpkg": version}


# ----------------------------------------------------------------------------- the stage


def test_stage_writes_same_bytes(tmp_path, monkeypatch):
    from stages import corpus as stage

    src = tmp_path / "src"
    src.mkdir()
    for p in sorted((STDLIB / "json").glob("*.py")) + sorted((STDLIB / "email").glob("*.py"))[:12]:
        shutil.copy(p, src / f"{p.parent.name}_{p.stem}.txt")
    rows = "".join(json.dumps({"text": f"row {i} " + "words " * 30}) + "\n" for i in range(40))
    (tmp_path / "rows.jsonl").write_text(rows)
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
    for path, data in outputs[0].items():  # each domain's digest is that of the bytes written
        if path.endswith(".jsonl"):
            kind, domain = path.split("/")[1], path.split("/")[2][:-len(".jsonl")]
            assert report["domains"][domain][f"{kind}_sha256"] == hashlib.sha256(data).hexdigest()
    files = report["provenance"]["user_sources"][0]["files"]
    assert len(files) == len(list(src.iterdir())) and files["src/json_decoder.txt"] == hashlib.sha256(
        (src / "json_decoder.txt").read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- bad inputs: one line, nothing written


def _params_file(tmp_path, user_sources):
    """A complete params.yaml with no built-in domain and the given user sources."""
    params = dataclasses.asdict(Params())
    params["corpus"].update(domains=[], heldout_docs=0, user_sources=user_sources)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))


def _run_stage_fails(tmp_path, monkeypatch, capsys) -> str:
    """Run the corpus stage as `python -m stages.corpus` does; return its one error line,
    after checking that the earlier outputs are byte for byte as they were."""
    from shear.stage import run_stage
    from stages import corpus as stage

    before = {"data/raw/old.jsonl": b'{"text": "earlier run"}\n', "data/heldout/old.jsonl": b"",
              "reports/corpus.json": b'{"earlier": true}\n'}
    for path, data in before.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(data)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["stages.corpus"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_stage(stage.__doc__, stage.main)
    assert e.value.code == 1
    out, err = capsys.readouterr()
    after = {p.relative_to(tmp_path).as_posix(): p.read_bytes()
             for p in sorted((tmp_path / "data").rglob("*")) + sorted((tmp_path / "reports").rglob("*")) if p.is_file()}
    assert after == before
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in out + err
    return err.strip()


def test_bad_latin1_text_source(tmp_path, monkeypatch, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("plain ascii text " * 10)
    (tmp_path / "notes" / "b.txt").write_bytes(("Gr\u00fc\u00dfe " * 20).encode("latin-1"))
    _params_file(tmp_path, [{"domain": "notes", "path": "notes/*.txt"}])
    assert _run_stage_fails(tmp_path, monkeypatch, capsys) == (
        "error: notes/b.txt: not valid utf-8 at byte 2 (0xfc); set corpus.user_sources[0].encoding to the "
        "file's encoding (e.g. latin-1, cp1252) or convert it to UTF-8")


def test_bad_non_utf8_jsonl(tmp_path, monkeypatch, capsys):
    data = b'{"text": "fine row"}\n{"text": "caf\xe9"}\n'
    (tmp_path / "rows.jsonl").write_bytes(data)
    _params_file(tmp_path, [{"domain": "rows", "path": "rows.jsonl", "format": "jsonl"}])
    assert _run_stage_fails(tmp_path, monkeypatch, capsys).startswith(
        f"error: rows.jsonl: not valid utf-8 at byte {data.index(0xe9)} (0xe9); set corpus.user_sources[0].encoding")


@pytest.mark.parametrize("path", ["missing.txt", "texts/*.md", "no_dir/"])
def test_bad_missing_file_or_empty_glob(tmp_path, monkeypatch, capsys, path):
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("text " * 30)
    _params_file(tmp_path, [{"domain": "notes", "path": "texts/a.txt"}, {"domain": "notes", "path": path}])
    assert _run_stage_fails(tmp_path, monkeypatch, capsys) == (
        f"error: corpus.user_sources[1].path={path!r}: no such file, directory or glob match "
        "(relative paths start at the repository root)")


def test_bad_garbage_parquet(tmp_path, monkeypatch, capsys):
    (tmp_path / "t.parquet").write_bytes(b"PAR1 this is not really parquet " * 4)
    _params_file(tmp_path, [{"domain": "table", "path": "t.parquet", "format": "parquet"}])
    assert _run_stage_fails(tmp_path, monkeypatch, capsys) == (
        "error: corpus.user_sources[0].path: t.parquet is not a readable Parquet file (ArrowInvalid)")


def test_bad_unknown_encoding(tmp_path, monkeypatch, capsys):
    (tmp_path / "a.txt").write_text("text " * 30)
    _params_file(tmp_path, [{"domain": "notes", "path": "a.txt", "encoding": "utf-9"}])
    assert _run_stage_fails(tmp_path, monkeypatch, capsys) == (
        "error: corpus.user_sources[0].encoding='utf-9' is not a known text encoding; e.g. utf-8, latin-1, cp1252")


def test_bad_user_file_not_tracked_by_dvc(tmp_path, monkeypatch, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("text " * 30)
    (tmp_path / "dvc.yaml").write_text("stages:\n  corpus:\n    cmd: python -m stages.corpus\n"
                                       "    deps: [stages/corpus.py, shear/corpus, notes/a.txt]\n")
    _params_file(tmp_path, [{"domain": "notes", "path": "notes/a.txt"}, {"domain": "notes", "path": "notes/*.txt"}])
    assert _run_stage_fails(tmp_path, monkeypatch, capsys) == (
        "error: corpus.user_sources[1].path: add notes to the deps of stage corpus in dvc.yaml, "
        "so that `dvc repro` re-runs the corpus when these files change")


# ----------------------------------------------------------------------------- staleness under DVC


def _sh(cmd: str, cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    done = subprocess.run(cmd, shell=True, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"`{cmd}` exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def test_editing_a_user_file_reruns_corpus_under_dvc(tmp_path):
    """A real git + DVC repository with the project's corpus stage and a user source it
    tracks (the untracked case is test_bad_user_file_not_tracked_by_dvc): editing the
    file makes `dvc status` report the stage changed, and `dvc repro` rebuilds data/raw."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("shear", "stages"):
        shutil.copytree(REPO / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    corpus_stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["corpus"]
    # the corpus stage alone: not the params stage's stamp, which the whole pipeline would make first
    corpus_stage["deps"] = [d for d in corpus_stage["deps"] if d != "reports/params/checked.json"] + ["notes"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"corpus": corpus_stage}}))
    _params_file(repo, [{"domain": "notes", "path": "notes/*.txt"}])
    (repo / "notes").mkdir()
    (repo / "notes" / "a.txt").write_text("The first version of this note, long enough to be kept.\n" * 3)
    _sh("git init -q && dvc init -q && git add -A && git commit -qm init", repo)

    _sh("dvc repro corpus", repo)
    assert "first version" in (repo / "data/raw/notes.jsonl").read_text()

    (repo / "notes" / "a.txt").write_text("The second version of this note, long enough to be kept.\n" * 3)
    status = _sh("dvc status corpus", repo)
    assert "changed deps" in status and "notes" in status, status
    assert "Running stage 'corpus'" in _sh("dvc repro corpus", repo)
    raw = (repo / "data/raw/notes.jsonl").read_text()
    assert "second version" in raw and "first version" not in raw
    assert "Running stage" not in _sh("dvc repro corpus", repo)
