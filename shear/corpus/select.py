"""From documents to the corpus: clean, deduplicate, cap each domain, set held-out
documents aside, and write JSONL."""
from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path
from typing import Iterable

import numpy as np

from shear.corpus.text import DOC_CHARS, normalise
from shear.errors import ShearError


def select_documents(by_domain: dict[str, list[dict]], max_chars: int, min_doc_chars: int,
                     heldout_docs: int, seed: int) -> tuple[dict, dict, dict]:
    """Clean, deduplicate, cap and split the documents of every domain.

    - whitespace is normalised; documents shorter than `min_doc_chars` are dropped;
    - an exact duplicate (same normalised text) is dropped, in any domain: the first
      seen wins, domains in the order given;
    - each domain's documents are shuffled with a generator seeded by (seed, domain);
      the first `heldout_docs` go to held-out (at most a fifth of the domain, so a small
      domain keeps most of its text), the next ones to raw until `max_chars` would be
      exceeded. Both keep the sources' reading order.

    Returns (raw, heldout, report): raw/heldout map domain -> documents.
    """
    seen: set[bytes] = set()
    raw, heldout, report = {}, {}, {"domains": {}}
    for domain, docs in by_domain.items():
        kept, short, dupes = [], 0, 0
        for d in docs:
            text = normalise(d["text"])
            if len(text) < min_doc_chars:
                short += 1
                continue
            key = hashlib.sha1(text.encode()).digest()
            if key in seen:
                dupes += 1
                continue
            seen.add(key)
            kept.append({**d, "text": text})
        if not kept:
            raise ShearError(
                f"corpus: domain {domain!r} has no document of at least {min_doc_chars} characters "
                "(after removing duplicates); check its sources or lower corpus.min_doc_chars"
            )
        rng = np.random.default_rng([seed, zlib.crc32(domain.encode())])
        order = rng.permutation(len(kept)).tolist()
        n_held = min(heldout_docs, len(kept) // 5)
        held_idx, raw_idx, total = order[:n_held], [], 0
        for i in order[n_held:]:
            if raw_idx and total + len(kept[i]["text"]) > max_chars:
                break
            raw_idx.append(i)
            total += len(kept[i]["text"])
        raw[domain] = [kept[i] for i in sorted(raw_idx)]
        heldout[domain] = [kept[i] for i in sorted(held_idx)]
        report["domains"][domain] = {
            "documents": len(raw[domain]),
            "characters": total,
            "heldout_documents": len(heldout[domain]),
            "heldout_characters": sum(len(d["text"]) for d in heldout[domain]),
            "dropped_short": short,
            "dropped_duplicates": dupes,
            "dropped_by_cap": len(kept) - len(raw_idx) - n_held,
            "sources": sorted({d["source"] for d in raw[domain] + heldout[domain]}),
            "license": ", ".join(sorted({d["license"] for d in raw[domain] + heldout[domain]})),
        }
    stats = report["domains"].values()
    keys = ("documents", "characters", "heldout_documents", "heldout_characters",
            "dropped_short", "dropped_duplicates", "dropped_by_cap")
    report["total"] = {k: sum(s[k] for s in stats) for k in keys}
    report["settings"] = {"max_chars_per_domain": max_chars, "min_doc_chars": min_doc_chars,
                          "heldout_docs": heldout_docs, "seed": seed, "doc_chars": DOC_CHARS}
    return raw, heldout, report


def write_jsonl(path: str | Path, docs: Iterable[dict]) -> str:
    """One JSON object per line, UTF-8, keys in the order of `doc`; returns the sha256 of
    the bytes written (the domain's digest in reports/corpus.json)."""
    data = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
    Path(path).write_bytes(data)
    return hashlib.sha256(data).hexdigest()
