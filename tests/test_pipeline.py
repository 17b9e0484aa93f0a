"""End to end: `dvc repro` of a tiny configuration in a temporary copy of the repository,
a second `dvc repro` that re-runs nothing, and sharing through a local DVC remote."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from shear.config import Params
from tests.conftest import REPO, stdlib_texts

VENV_BIN = Path(sys.executable).parent


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", DVC_NO_ANALYTICS="1", PYTHONUNBUFFERED="1")
    return env


def sh(cmd: str, cwd: Path) -> str:
    """Run a shell command; on failure show its output."""
    done = subprocess.run(cmd, shell=True, cwd=cwd, env=_env(), capture_output=True, text=True)
    if done.returncode != 0:
        raise AssertionError(f"`{cmd}` failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done.stdout + done.stderr


TINY_PARAMS = {
    "run": {"seed": 0, "device": "cpu"},
    "base": {"source": "tiny:layers=6,hidden=64,heads=4,kv_heads=2,mlp=128"},
    "corpus": {"domains": ["code"], "max_chars_per_domain": 150_000, "heldout_docs": 10,
               "user_sources": [{"domain": "books", "path": "texts/*.txt", "format": "text", "license": "PSF-2.0"}]},
    "shards": {"seq_len": 64, "calib_fraction": 0.1, "eval_fraction": 0.1, "max_tokens_per_domain": 60_000},
    "score": {"block_criteria": ["ppl", "bi", "taylor+"], "width_criteria": ["magnitude"], "calib_sequences": 4,
              "calib_seq_len": 32, "batch_size": 4, "keep_first": 1, "keep_last": 1},
    "prune": {"method": "depth", "depth": {"criterion": "ppl", "ratio": 0.34}},
    "retrain": {"method": "lora", "tokens": 2048, "batch_size": 2, "seq_len": 32, "checkpoint_every": 4,
                "eval_every": 8},
    "evaluate": {"ppl_seq_lens": [32, 64], "ppl_max_tokens": 2048, "batch_size": 4, "tasks": ["shear_lastword"],
                 "task_limit": 8, "speed": {"batch_sizes": [1], "prompt_len": 8, "new_tokens": 4, "repeats": 1}},
}


def _merge(defaults: dict, overrides: dict) -> dict:
    out = dict(defaults)
    for key, value in overrides.items():
        out[key] = _merge(defaults[key], value) if isinstance(value, dict) and defaults.get(key) else value
    return out


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory) -> Path:
    """A git + DVC copy of the repository with tiny params and its own text files, reproduced once."""
    repo = tmp_path_factory.mktemp("repo")
    for name in ("dvc.yaml", "shear", "stages", "configs", ".dvc", ".gitignore"):
        src = REPO / name
        (shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
         if src.is_dir() else shutil.copy(src, repo / name))
    # DVC needs every parameter a stage names to be present: write the defaults, then the tiny overrides.
    (repo / "params.yaml").write_text(yaml.safe_dump(_merge(dataclasses.asdict(Params()), TINY_PARAMS)))
    (repo / "texts").mkdir()
    for i, text in enumerate(stdlib_texts(40)):
        # Prose-like text for the "books" domain: the docstrings and comments of stdlib modules.
        lines = [ln.strip(" #") for ln in text.splitlines() if ln.strip().startswith(("#", '"""')) or ln[:1].isalpha()]
        (repo / "texts" / f"{i:02d}.txt").write_text("\n".join(lines) + "\n")
    sh("git init -q && git add -A && git commit -qm init", repo)
    sh("dvc repro", repo)
    return repo


def test_repro_writes_every_output(tiny_repo):
    for path in ("data/models/base/shear.json", "data/models/pruned/shear.json", "data/models/retrained/shear.json",
                 "reports/corpus.json", "reports/scores/block_ppl.json", "reports/report.md"):
        assert (tiny_repo / path).is_file(), path
    pruned = json.loads((tiny_repo / "data/models/pruned/shear.json").read_text())
    assert pruned["method"] == "depth" and len(pruned["removed_blocks"]) == 2
    assert pruned["architecture"]["num_hidden_layers"] == 4
    for model in ("base", "pruned", "retrained"):
        metrics = json.loads((tiny_repo / f"reports/eval/{model}/metrics.json").read_text())
        assert set(metrics["ppl"]) == {"32", "64"}


def test_second_repro_runs_nothing(tiny_repo):
    out = sh("dvc repro", tiny_repo)
    assert "Running stage" not in out, out
    assert "up to date" in sh("dvc status", tiny_repo)


def test_share_through_local_remote(tiny_repo, tmp_path):
    remote = tmp_path / "remote"
    sh(f"dvc remote add -d -f team {remote} && git add -A && git commit -qm results && dvc push -q", tiny_repo)
    clone = tmp_path / "clone"
    sh(f"git clone -q {tiny_repo} {clone}", tmp_path)
    sh("dvc pull -q", clone)
    assert (clone / "data/models/retrained/model.safetensors").is_file()
    status = sh("dvc status", clone)
    assert "up to date" in status, status
