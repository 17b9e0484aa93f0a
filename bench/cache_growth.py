"""`.dvc/cache` growth of one CPT experiment, with training checkpoints cached (before) and not (now).

A scratch git + DVC copy of the repository with the tiny pipeline of tests/test_pipeline.py
(tiny random base model, stdlib text) and `retrain.method: cpt`, whose dvc.yaml caches the
checkpoint outs as before (`{persist: true}`), runs `dvc repro` once and is committed. A copy of
it commits the change measured (`{persist: true, cache: false}`, as dvc.yaml has now). Each then
runs one experiment `dvc exp run -S retrain.lr=...` (retrain and what follows it); the cache is
measured before and after and the new objects are attributed to the outs of the experiment's
dvc.lock. Only the scratch copies are edited. Writes bench/results/cache_growth.{json,md}.

    python -m bench.cache_growth [--scratch /tmp/cache_growth]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path

import yaml

from shear.io import atomic_file, write_json
from shear.speed import machine_info
from tests.conftest import REPO, full_params, stdlib_texts
from tests.test_pipeline import TINY_PARAMS, _env

RESULTS = Path(__file__).resolve().parent / "results"
CHECKPOINT_OUTS = ("data/checkpoints/prune", "data/checkpoints/retrain")
EXPERIMENT = "retrain.lr=0.0002"


def sh(cmd: str, cwd: Path) -> str:
    done = subprocess.run(cmd, shell=True, cwd=cwd, env=_env(), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"`{cmd}` failed in {cwd}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout + done.stderr


def make_repo(root: Path) -> Path:
    """A git + DVC copy of the repository with the tiny CPT pipeline (the test's, method cpt) whose
    dvc.yaml caches the training checkpoints, as before they became `cache: false`."""
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    for name in ("dvc.yaml", "shear", "stages", "configs", ".dvc", ".gitignore"):
        src = REPO / name
        (shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
         if src.is_dir() else shutil.copy(src, root / name))
    dvc = yaml.safe_load((root / "dvc.yaml").read_text())
    dvc["stages"]["corpus"]["deps"].append("texts")
    (root / "dvc.yaml").write_text(yaml.safe_dump(checkpoint_outs(dvc, cached=True), sort_keys=False))
    params = json.loads(json.dumps(TINY_PARAMS))
    params["retrain"]["method"] = "cpt"
    (root / "params.yaml").write_text(yaml.safe_dump(full_params(params)))
    (root / "texts").mkdir()
    for i, text in enumerate(stdlib_texts(40)):
        lines = [ln.strip(" #") for ln in text.splitlines() if ln.strip().startswith(("#", '"""')) or ln[:1].isalpha()]
        (root / "texts" / f"{i:02d}.txt").write_text("\n".join(lines) + "\n")
    sh("git init -q && git add -A && git commit -qm init", root)
    return root


def checkpoint_outs(dvc: dict, cached: bool) -> dict:
    """dvc.yaml with the training checkpoint outs `{persist: true}` (cached) or `{persist: true, cache: false}`."""
    for stage in dvc["stages"].values():
        for i, out in enumerate(stage.get("outs", [])):
            if isinstance(out, dict) and next(iter(out)) in CHECKPOINT_OUTS:
                stage["outs"][i] = {next(iter(out)): {"persist": True} if cached else {"persist": True, "cache": False}}
    return dvc


def cache_objects(root: Path) -> dict[str, int]:
    """md5 -> size of every object in the repository's DVC cache."""
    cache = root / ".dvc" / "cache" / "files" / "md5"
    return {p.parent.name + p.name: p.stat().st_size for p in cache.glob("*/*") if p.is_file()} if cache.is_dir() \
        else {}


def attribute(root: Path, new: dict[str, int]) -> dict[str, int]:
    """Bytes of the new cache objects per out of the workspace's dvc.lock (the experiment's)."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    cache = root / ".dvc" / "cache" / "files" / "md5"
    by_out: dict[str, int] = {}
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            md5 = out.get("md5", "")
            if md5.endswith(".dir"):
                listing = cache / md5[:2] / md5[2:]
                if not listing.is_file():
                    continue
                files = json.loads(listing.read_text())
                size = sum(new.get(f["md5"], 0) for f in files) + new.get(md5, 0)
            else:
                size = new.get(md5, 0)
            if size:
                by_out[out["path"]] = by_out.get(out["path"], 0) + size
    return by_out


def experiment(root: Path, cached_checkpoints: bool) -> dict:
    """One `dvc exp run` in `root`: the cache objects it added, by out."""
    before = cache_objects(root)
    t0 = time.perf_counter()
    out = sh(f"dvc exp run -S {EXPERIMENT}", root)
    after = cache_objects(root)
    new = {k: v for k, v in after.items() if k not in before}
    checkpoint = sum(p.stat().st_size for p in (root / "data/checkpoints/retrain").rglob("*") if p.is_file())
    return {"checkpoints_cached": cached_checkpoints, "experiment_s": round(time.perf_counter() - t0, 1),
            "stages_run": [ln.split("'")[1] for ln in out.splitlines() if ln.startswith("Running stage")],
            "cache_before_bytes": sum(before.values()), "cache_after_bytes": sum(after.values()),
            "growth_bytes": sum(new.values()), "new_objects": len(new), "growth_by_out": attribute(root, new),
            "retrain_checkpoint_bytes": checkpoint}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scratch", default="/tmp/cache_growth", help="where the two scratch repositories go")
    args = parser.parse_args()
    scratch = Path(args.scratch)
    # One baseline run with cached checkpoints, copied; the copy then gets the change this measures
    # (checkpoints `cache: false`) as a commit, and each copy runs the same experiment.
    before, now = scratch / "before", scratch / "now"
    make_repo(before)
    t0 = time.perf_counter()
    sh("dvc repro", before)
    sh("git add -A && git commit -qm baseline", before)
    baseline_s = round(time.perf_counter() - t0, 1)
    if now.exists():
        shutil.rmtree(now)
    shutil.copytree(before, now, symlinks=True)
    dvc = yaml.safe_load((now / "dvc.yaml").read_text())
    (now / "dvc.yaml").write_text(yaml.safe_dump(checkpoint_outs(dvc, cached=False), sort_keys=False))
    sh("git add -A && git commit -qm 'training checkpoints: cache false'", now)
    rows = []
    for root, cached in ((before, True), (now, False)):
        rows.append({**experiment(root, cached), "baseline_s": baseline_s})
        print(json.dumps(rows[-1]), flush=True)
    info = machine_info("cpu")
    write_json(RESULTS / "cache_growth.json", {"machine": info, "experiment": EXPERIMENT, "rows": rows,
                                               "params": TINY_PARAMS})
    kib = lambda n: f"{n / 1024:,.1f}"  # noqa: E731
    lines = ["# `.dvc/cache` growth of one CPT experiment: checkpoints cached (before) vs not (now)", "",
             f"Machine: {info['cpu']}; torch {info['torch']}, transformers {info['transformers']}; "
             f"load average {info['load_average'][0]:.1f}.", "",
             "Command: `python -m bench.cache_growth` (this file's numbers). A scratch git + DVC copy of "
             "the repository with the tiny pipeline of tests/test_pipeline.py (base `"
             f"{TINY_PARAMS['base']['source']}`, stdlib text) and `retrain.method: cpt` "
             f"({TINY_PARAMS['retrain']['tokens']} tokens, checkpoint every {TINY_PARAMS['retrain']['checkpoint_every']}"
             f" steps) whose dvc.yaml caches the checkpoints as before (`data/checkpoints/{{prune,retrain}}: "
             "{persist: true}`) runs `dvc repro` once and is committed; a copy of it commits the change measured "
             "(`{persist: true, cache: false}`, as dvc.yaml has now); each then runs the same experiment "
             f"`dvc exp run -S {EXPERIMENT}`. Growth = bytes of the cache objects the experiment added.",
             "", "| variant | stages the experiment ran | cache before KiB | growth KiB | new objects | "
             "growth by out (KiB) | retrain checkpoint on disk KiB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        parts = ", ".join(f"{k} {kib(v)}" for k, v in sorted(r["growth_by_out"].items(), key=lambda kv: -kv[1]))
        lines.append(f"| {'before (cached)' if r['checkpoints_cached'] else 'now (cache: false)'} | "
                     f"{', '.join(r['stages_run'])} | {kib(r['cache_before_bytes'])} | **{kib(r['growth_bytes'])}** | "
                     f"{r['new_objects']} | {parts} | {kib(r['retrain_checkpoint_bytes'])} |")
    with atomic_file(RESULTS / "cache_growth.md") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'cache_growth.md'}")


if __name__ == "__main__":
    main()
