"""Shared fixtures: tiny random LLaMA models and small corpora the tests build themselves."""
from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

import pytest
import torch

from shear.models import make_tiny_model, offline

offline()
# Tiny models run fastest on one thread, and tests that start subprocesses (accelerate, dvc)
# must not oversubscribe CI's two cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent


def stdlib_texts(n: int = 40, min_chars: int = 2000) -> list[str]:
    """Real text for tests: the first `n` Python standard-library modules of a useful size."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for path in sorted(root.glob("*.py")):
        text = path.read_text(errors="ignore")
        if len(text) >= min_chars:
            texts.append(text[:20000])
        if len(texts) == n:
            break
    return texts


@pytest.fixture
def tiny():
    """(model, tokenizer) of a 4-layer random LLaMA with a byte-level tokenizer."""
    return make_tiny_model("layers=4,hidden=64,heads=4,kv_heads=2,mlp=128", seed=0)


@pytest.fixture
def raw_corpus(tmp_path) -> Path:
    """A data/raw-like directory with two domains of stdlib text."""
    raw = tmp_path / "raw"
    raw.mkdir()
    texts = stdlib_texts(40)
    for domain, part in (("code", texts[:20]), ("prose", [t.replace("def ", "so ") for t in texts[20:]])):
        with open(raw / f"{domain}.jsonl", "w") as f:
            for t in part:
                f.write(json.dumps({"text": t, "source": "python-stdlib", "license": "PSF-2.0"}) + "\n")
    return raw


@pytest.fixture
def shards(tmp_path, raw_corpus, tiny) -> Path:
    """Packed shards (seq_len 64) of `raw_corpus` tokenized with the tiny tokenizer."""
    from shear.data import build_shards

    out = tmp_path / "shards"
    build_shards(raw_corpus, tiny[1], out, seq_len=64, calib_fraction=0.15, eval_fraction=0.15,
                 max_tokens_per_domain=200_000, seed=0)
    return out


def full_params(overrides: dict) -> dict:
    """A complete params mapping (every section and key, as a params file must have): the defaults with `overrides`."""
    import dataclasses

    from shear.config import Params

    def merge(defaults: dict, changes: dict) -> dict:
        out = dict(defaults)
        for key, value in changes.items():
            out[key] = merge(defaults[key], value) if isinstance(value, dict) and defaults.get(key) else value
        return out

    return merge(dataclasses.asdict(Params()), overrides)
