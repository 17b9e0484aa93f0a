"""Token shards: tokenize each domain, split by document, pack, store memory-mapped.

Layout written by `build_shards`:

    data/shards/manifest.json           seq_len, tokenizer fingerprint, tokens per domain/split
    data/shards/<domain>/<split>.npy    uint16/uint32 array [sequences, seq_len]

Documents are joined with the EOS token (no BOS: SmolLM2's tokenizer adds none) and
packed into fixed-length rows; the tail that does not fill a row is dropped. A document
lands in exactly one split.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np
from tqdm import tqdm

from shear.errors import ShearError
from shear.io import atomic_dir, read_json
from shear.models import tokenizer_fingerprint

if TYPE_CHECKING:  # torch is imported where it is used, not at import time
    import torch

SPLITS = ("train", "calib", "eval")


def read_jsonl_docs(path: str | Path) -> list[dict]:
    """Every JSON object of a JSONL file of documents (each has a string `text` field)."""
    path = Path(path)
    docs = []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError:
                doc = None
            if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
                raise ShearError(f"{path}:{n}: corrupt line (expected JSON with a 'text' field)")
            docs.append(doc)
    return docs


def read_jsonl_texts(path: str | Path) -> list[str]:
    """The `text` field of every line of a JSONL file."""
    return [doc["text"] for doc in read_jsonl_docs(path)]


def split_documents(n_docs: int, calib_fraction: float, eval_fraction: float, seed: int) -> list[str]:
    """Assign each document to train/calib/eval by a seeded shuffle (at least one each when n >= 3)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_docs)
    n_calib = max(1, round(n_docs * calib_fraction)) if n_docs >= 3 else 0
    n_eval = max(1, round(n_docs * eval_fraction)) if n_docs >= 3 else 0
    splits = ["train"] * n_docs
    for i in order[:n_calib]:
        splits[i] = "calib"
    for i in order[n_calib:n_calib + n_eval]:
        splits[i] = "eval"
    return splits


def pack(token_lists: Iterable[list[int]], seq_len: int, eos_id: int, dtype=np.uint16) -> np.ndarray:
    """Concatenate documents, each followed by EOS, into rows of `seq_len` tokens."""
    stream = []
    for ids in token_lists:
        stream.extend(ids)
        stream.append(eos_id)
    n = len(stream) // seq_len
    return np.asarray(stream[: n * seq_len], dtype=dtype).reshape(n, seq_len)


def token_dtype(vocab_size: int):
    """The smallest unsigned dtype that holds every token id."""
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


def build_shards(raw_dir: str | Path, tokenizer, out_dir: str | Path, seq_len: int,
                 calib_fraction: float, eval_fraction: float, max_tokens_per_domain: int,
                 seed: int, min_eval_tokens: int = 0) -> dict:
    """Tokenize every `<raw_dir>/<domain>.jsonl`, split, pack and write shards; returns the manifest.

    A domain whose eval split holds fewer than `min_eval_tokens` tokens is refused (nothing is
    written): evaluation and the held-out losses of later stages would fail on it.
    """
    raw_files = sorted(Path(raw_dir).glob("*.jsonl"))
    if not raw_files:
        raise ShearError(f"{raw_dir}: no <domain>.jsonl files; run the corpus stage first")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ShearError("the base model's tokenizer has no EOS token; shards need one to separate documents")
    dtype = token_dtype(len(tokenizer))
    manifest = {
        "seq_len": seq_len,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "bos": False,
        "separator": "eos",
        "eos_token_id": eos,
        "dtype": np.dtype(dtype).name,
        "seed": seed,
        "domains": {},
    }
    with atomic_dir(out_dir) as tmp:
        for path in tqdm(raw_files, desc="shards", unit="domain"):
            domain = path.stem
            texts = read_jsonl_texts(path)
            # Seeded document order, then cap the domain's size before splitting.
            rng = np.random.default_rng(seed)
            texts = [texts[i] for i in rng.permutation(len(texts))]
            ids, total = [], 0
            for start in range(0, len(texts), 256):
                for doc in tokenizer(texts[start:start + 256], add_special_tokens=False)["input_ids"]:
                    ids.append(doc)
                    total += len(doc) + 1
                if total >= max_tokens_per_domain:
                    break
            assignment = split_documents(len(ids), calib_fraction, eval_fraction, seed)
            (tmp / domain).mkdir()
            entry = {}
            for split in SPLITS:
                docs = [d for d, s in zip(ids, assignment) if s == split]
                arr = pack(docs, seq_len, eos, dtype)
                np.save(tmp / domain / f"{split}.npy", arr)
                entry[split] = {"documents": len(docs), "sequences": int(arr.shape[0]), "tokens": int(arr.size)}
            if entry["eval"]["tokens"] < min_eval_tokens:
                raise ShearError(
                    f"{path}: domain {domain} has {entry['eval']['tokens']:,} held-out (eval) tokens; evaluation and "
                    f"the held-out losses need {min_eval_tokens:,}: add text to it, raise shards.eval_fraction or "
                    "leave it out of corpus.domains / corpus.user_sources")
            manifest["domains"][domain] = entry
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def load_manifest(shards_dir: str | Path, tokenizer=None) -> dict:
    """Read the manifest; with a tokenizer, refuse shards made by a different one."""
    manifest = read_json(Path(shards_dir) / "manifest.json")
    if tokenizer is not None:
        fp = tokenizer_fingerprint(tokenizer)
        if manifest.get("tokenizer_fingerprint") != fp:
            raise ShearError(
                f"{shards_dir}/manifest.json: shards were tokenized with tokenizer {manifest.get('tokenizer_fingerprint')}, "
                f"but this model's tokenizer is {fp}; re-run the shards stage for this model"
            )
    return manifest


def load_split(shards_dir: str | Path, domain: str, split: str) -> np.ndarray:
    """Memory-mapped [sequences, seq_len] token array of one domain and split."""
    path = Path(shards_dir) / domain / f"{split}.npy"
    if not path.is_file():
        raise ShearError(f"{path}: shard not found; valid splits: {', '.join(SPLITS)} (re-run the shards stage)")
    try:
        return np.load(path, mmap_mode="r")
    except (ValueError, OSError) as e:
        raise ShearError(f"{path}: corrupt shard ({e}); re-run the shards stage") from None


def rechunk(array: np.ndarray, seq_len: int) -> np.ndarray:
    """View packed rows as rows of another length (the tail that does not fill a row is dropped)."""
    flat = np.asarray(array).reshape(-1)
    n = flat.size // seq_len
    return flat[: n * seq_len].reshape(n, seq_len)


def load_domains(shards_dir: str | Path, split: str, tokenizer=None) -> dict[str, np.ndarray]:
    """Every domain's array for one split, checked against the tokenizer when given."""
    manifest = load_manifest(shards_dir, tokenizer)
    return {d: load_split(shards_dir, d, split) for d in manifest["domains"]}


def calibration_batch(shards_dir: str | Path, n_sequences: int, seq_len: int, tokenizer=None,
                      split: str = "calib") -> torch.Tensor:
    """`n_sequences` rows of `seq_len` tokens from the calib split, taken round-robin over domains.

    Deterministic (first rows of each domain), so every criterion scores on the same data.
    """
    import torch

    per_domain = {d: rechunk(a, seq_len) for d, a in load_domains(shards_dir, split, tokenizer).items()}
    rows, i = [], 0
    while len(rows) < n_sequences:
        added = False
        for arr in per_domain.values():
            if i < len(arr) and len(rows) < n_sequences:
                rows.append(np.asarray(arr[i], dtype=np.int64))
                added = True
        if not added:
            available = sum(len(a) for a in per_domain.values())
            raise ShearError(
                f"{shards_dir}: the {split} split holds {available} sequences of {seq_len} tokens, "
                f"fewer than the {n_sequences} asked for; lower score.calib_sequences or add text"
            )
        i += 1
    return torch.from_numpy(np.stack(rows))
