"""Shards: document-level splits, manifest counts, determinism, tokenizer fingerprint check."""
import hashlib
import json
import re

import numpy as np
import pytest

from shear.data import build_shards, calibration_batch, load_manifest, load_split, pack, rechunk, split_documents
from shear.errors import ShearError
from shear.models import make_tiny_model


def _marked_corpus(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    with open(raw / "prose.jsonl", "w") as f:
        for i in range(60):
            body = f" DOC{i:04d} " * 20  # the marker repeats so any piece of the doc names it
            f.write(json.dumps({"text": body, "source": "test", "license": "CC0"}) + "\n")
    return raw


def test_no_document_in_two_splits(tmp_path, tiny):
    raw = _marked_corpus(tmp_path)
    build_shards(raw, tiny[1], tmp_path / "s", seq_len=32, calib_fraction=0.2, eval_fraction=0.2,
                 max_tokens_per_domain=10**6, seed=3)
    seen = {}
    for split in ("train", "calib", "eval"):
        text = tiny[1].decode(load_split(tmp_path / "s", "prose", split).reshape(-1).tolist())
        seen[split] = set(re.findall(r"DOC\d{4}", text))
        assert seen[split], split
    assert not (seen["train"] & seen["calib"]) and not (seen["train"] & seen["eval"]) and not (seen["calib"] & seen["eval"])


def test_manifest_counts_match_arrays_and_same_seed_same_bytes(tmp_path, raw_corpus, tiny):
    digests = []
    for run in ("a", "b"):
        out = tmp_path / run
        manifest = build_shards(raw_corpus, tiny[1], out, seq_len=64, calib_fraction=0.1, eval_fraction=0.1,
                                max_tokens_per_domain=10**6, seed=0)
        h = hashlib.sha256()
        for domain, splits in manifest["domains"].items():
            for split, entry in splits.items():
                arr = load_split(out, domain, split)
                assert arr.shape == (entry["sequences"], 64) and arr.size == entry["tokens"]
                h.update(np.ascontiguousarray(arr).tobytes())
        assert manifest == json.loads((out / "manifest.json").read_text())
        digests.append(h.hexdigest())
    assert digests[0] == digests[1]


def test_other_seed_gives_other_split(tmp_path, raw_corpus, tiny):
    a = split_documents(100, 0.1, 0.1, seed=0)
    b = split_documents(100, 0.1, 0.1, seed=1)
    assert a != b and a.count("calib") == 10 and a.count("eval") == 10


def test_tokenizer_fingerprint_mismatch_is_refused(shards, tiny):
    load_manifest(shards, tiny[1])

    other = make_tiny_model()[1]
    other.add_tokens(["<extra>"])
    with pytest.raises(ShearError, match="re-run the shards stage"):
        load_manifest(shards, other)


def test_pack_and_rechunk():
    arr = pack([[1, 2, 3], [4, 5]], seq_len=3, eos_id=0)
    assert arr.tolist() == [[1, 2, 3], [0, 4, 5]]  # the trailing EOS does not fill a row
    assert rechunk(np.arange(10).reshape(2, 5), 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_calibration_batch_round_robin_and_too_few(shards, tiny):
    batch = calibration_batch(shards, 4, 16, tiny[1])
    assert batch.shape == (4, 16)
    with pytest.raises(ShearError, match="lower score.calib_sequences"):
        calibration_batch(shards, 10**6, 64, tiny[1])


def test_corrupt_shard_names_the_file(shards):
    (shards / "code" / "eval.npy").write_bytes(b"garbage")
    with pytest.raises(ShearError, match="eval.npy: corrupt shard"):
        load_split(shards, "code", "eval")


def test_domain_too_small_for_evaluation_is_refused_and_nothing_written(tmp_path, raw_corpus, tiny):
    manifest = build_shards(raw_corpus, tiny[1], tmp_path / "ok", seq_len=64, calib_fraction=0.15, eval_fraction=0.15,
                            max_tokens_per_domain=200_000, seed=0)
    smallest = min(manifest["domains"], key=lambda d: manifest["domains"][d]["eval"]["tokens"])
    tokens = manifest["domains"][smallest]["eval"]["tokens"]
    with pytest.raises(ShearError) as e:
        build_shards(raw_corpus, tiny[1], tmp_path / "shards", seq_len=64, calib_fraction=0.15, eval_fraction=0.15,
                     max_tokens_per_domain=200_000, seed=0, min_eval_tokens=tokens + 1)
    assert str(e.value) == (f"{raw_corpus / smallest}.jsonl: domain {smallest} has {tokens:,} held-out (eval) tokens; "
                            f"evaluation and the held-out losses need {tokens + 1:,}: add text to it, raise "
                            "shards.eval_fraction or leave it out of corpus.domains / corpus.user_sources")
    assert not (tmp_path / "shards").exists() and list(tmp_path.glob(".shards*")) == []
    build_shards(raw_corpus, tiny[1], tmp_path / "shards", seq_len=64, calib_fraction=0.15, eval_fraction=0.15,
                 max_tokens_per_domain=200_000, seed=0, min_eval_tokens=tokens)  # exactly enough passes
