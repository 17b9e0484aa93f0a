"""Atomic outputs: write to a temporary sibling, then rename into place.

A stage that fails half-way leaves no half-written output behind, and a reader never
sees a partial file.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def recover_dir(path: str | Path) -> None:
    """Undo what a killed `atomic_dir` left next to `path`.

    A kill between its two renames leaves `path` missing and the previous output in
    `.<name>.old-*`: that is put back. Temporary (`.<name>.tmp-*`, maybe half-written) and
    replaced (`.<name>.old-*`) directories of earlier killed runs are removed.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return
    olds = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if not path.exists() and olds:
        os.replace(olds.pop(), path)  # the newest replaced output is the last complete one
    for leftover in [*olds, *path.parent.glob(f".{path.name}.tmp-*")]:
        shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces `path` only if the block succeeds.

    The output path is never missing for long: the old output is renamed aside, the new one
    renamed in, the old one removed; a kill between the renames is repaired by the next
    `atomic_dir` (or `recover_dir`) on the same path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; outputs are ordinary readable directories
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[Any]:
    """Open a temporary sibling of `path` for writing; rename it over `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def read_json(path: str | Path) -> Any:
    """Read a JSON file, turning a missing or corrupt file into a one-line ShearError."""
    from shear.errors import ShearError

    path = Path(path)
    if not path.is_file():
        raise ShearError(f"{path}: file not found (run the stage that writes it first, e.g. `dvc repro`)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShearError(f"{path}: corrupt JSON ({e.__class__.__name__}: {e}); delete it and re-run its stage") from None


def file_digest(paths: list[str | Path]) -> str:
    """A short sha256 of the bytes of `paths`, in the order given (e.g. a model's config and weights)."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def model_digest(directory: str | Path) -> str:
    """file_digest of a saved model's config.json and safetensors: a different model is a different run."""
    directory = Path(directory)
    return file_digest([directory / "config.json", *sorted(directory.glob("*.safetensors"))])


def run_hash(definition: dict[str, Any]) -> str:
    """A short hash of everything that defines a training run (params, start model, data):
    a checkpoint whose hash differs belongs to another run and is not resumed."""
    return hashlib.sha256(json.dumps(definition, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _tsv_step(line: str, width: int, col: int) -> int | None:
    """The step of a DVCLive tsv row, or None when a kill cut the row short (fewer cells, or a cell
    that is not a number)."""
    cells = line.split("\t")
    try:
        for c in cells:
            float(c)  # raises on an empty or non-numeric cell; nan and inf are values, kept
        return int(cells[col]) if len(cells) == width else None
    except ValueError:
        return None


def trim_logs(live_dir: str | Path, step: int) -> None:
    """Make a killed run's DVCLive logs fit to resume at `step`: drop rows logged after it, and what
    the kill may have cut short. DVCLive appends tsv rows and rewrites `metrics.json` in place, not
    atomically, and a run is often killed in the middle of doing so (right after a checkpoint): a
    cut row is dropped, a tsv whose header was cut is removed (DVCLive writes a new one), and an
    unreadable summary is removed (the next step writes it again)."""
    live_dir = Path(live_dir)
    for tsv in (live_dir / "plots" / "metrics").rglob("*.tsv"):
        lines = tsv.read_text().splitlines()
        header = lines[0].split("\t") if lines else []
        if "step" not in header:
            tsv.unlink()
            continue
        col = header.index("step")
        kept = [lines[0]] + [ln for ln in lines[1:] if (s := _tsv_step(ln, len(header), col)) is not None and s <= step]
        with atomic_file(tsv) as f:
            f.write("\n".join(kept) + "\n")
    summary = live_dir / "metrics.json"
    if summary.is_file():
        try:
            json.loads(summary.read_text())
        except ValueError:
            summary.unlink()
