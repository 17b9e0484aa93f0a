"""Stage `corpus`: text per domain -> data/raw/<domain>.jsonl, data/heldout/<domain>.jsonl, reports/corpus.json."""
import dataclasses
from pathlib import Path

import yaml

from shear.corpus.select import select_documents, write_jsonl
from shear.corpus.sources import collect_documents, provenance
from shear.corpus.user import untracked_sources
from shear.errors import ShearError
from shear.io import atomic_dir, write_json
from shear.paths import CORPUS_REPORT, HELDOUT, RAW


def check_tracked(user_sources: list[dict], dvc_yaml: Path = Path("dvc.yaml")) -> None:
    """Refuse user files that dvc.yaml does not list as deps of this stage: DVC could not
    see them change, and data/raw would go stale while `dvc status` said "up to date"."""
    if not dvc_yaml.is_file():  # run outside a DVC project: nothing to keep up to date
        return
    deps = (yaml.safe_load(dvc_yaml.read_text()).get("stages", {}).get("corpus") or {}).get("deps", [])
    missing = untracked_sources(user_sources, deps)
    if missing:
        which = ", ".join(f"[{i}]" for i, _ in missing)
        paths = ", ".join(dict.fromkeys(path for _, path in missing))
        raise ShearError(f"corpus.user_sources{which}.path: add {paths} to the deps of stage corpus in {dvc_yaml}, "
                         "so that `dvc repro` re-runs the corpus when these files change")


def main(params, args):
    corpus = params.corpus
    user_sources = [dataclasses.asdict(source) for source in corpus.user_sources]
    check_tracked(user_sources)
    by_domain = collect_documents(corpus.domains, user_sources)
    raw, heldout, report = select_documents(by_domain, corpus.max_chars_per_domain, corpus.min_doc_chars,
                                            corpus.heldout_docs, params.run.seed)
    report["provenance"] = provenance(corpus.domains, user_sources)
    with atomic_dir(RAW) as raw_tmp, atomic_dir(HELDOUT) as heldout_tmp:
        for domain, stats in report["domains"].items():
            stats["raw_sha256"] = write_jsonl(raw_tmp / f"{domain}.jsonl", raw[domain])
            stats["heldout_sha256"] = write_jsonl(heldout_tmp / f"{domain}.jsonl", heldout[domain])
    write_json(CORPUS_REPORT, report)
    for domain, counts in report["domains"].items():
        print(f"corpus: {domain:14s} {counts['documents']:6,} documents {counts['characters']:11,} characters "
              f"(+{counts['heldout_documents']} held out)")
    t = report["total"]
    print(f"corpus: {'total':14s} {t['documents']:6,} documents {t['characters']:11,} characters "
          f"(+{t['heldout_documents']} held out, {t['dropped_duplicates']} duplicates removed)")


if __name__ == "__main__":
    from shear.stage import run_stage

    run_stage(__doc__, main)
