"""Stage `corpus`: text per domain -> data/raw/<domain>.jsonl, data/heldout/<domain>.jsonl, reports/corpus.json."""
import dataclasses

from shear.corpus import collect_documents, select_documents, write_jsonl
from shear.io import atomic_dir, write_json

RAW, HELDOUT, REPORT = "data/raw", "data/heldout", "reports/corpus.json"


def main(params, args):
    c = params.corpus
    by_domain = collect_documents(c.domains, [dataclasses.asdict(s) for s in c.user_sources])
    raw, heldout, report = select_documents(by_domain, c.max_chars_per_domain, c.min_doc_chars,
                                            c.heldout_docs, params.base.seed)
    with atomic_dir(RAW) as raw_tmp, atomic_dir(HELDOUT) as heldout_tmp:
        for domain in raw:
            write_jsonl(raw_tmp / f"{domain}.jsonl", raw[domain])
            write_jsonl(heldout_tmp / f"{domain}.jsonl", heldout[domain])
    write_json(REPORT, report)
    for domain, s in report["domains"].items():
        print(f"corpus: {domain:14s} {s['documents']:6,} documents {s['characters']:11,} characters "
              f"(+{s['heldout_documents']} held out)")
    t = report["total"]
    print(f"corpus: {'total':14s} {t['documents']:6,} documents {t['characters']:11,} characters "
          f"(+{t['heldout_documents']} held out, {t['dropped_duplicates']} duplicates removed)")


if __name__ == "__main__":
    from shear.stage import run_stage

    run_stage(__doc__, main)
