"""Stage `corpus`: text per domain -> data/raw/<domain>.jsonl, data/heldout/<domain>.jsonl, reports/corpus.json."""
import dataclasses

from shear.corpus import collect_documents, select_documents, write_jsonl
from shear.io import atomic_dir, write_json

RAW, HELDOUT, REPORT = "data/raw", "data/heldout", "reports/corpus.json"


def main(params, args):
    corpus = params.corpus
    by_domain = collect_documents(corpus.domains, [dataclasses.asdict(source) for source in corpus.user_sources])
    raw, heldout, report = select_documents(by_domain, corpus.max_chars_per_domain, corpus.min_doc_chars,
                                            corpus.heldout_docs, params.run.seed)
    with atomic_dir(RAW) as raw_tmp, atomic_dir(HELDOUT) as heldout_tmp:
        for domain in raw:
            write_jsonl(raw_tmp / f"{domain}.jsonl", raw[domain])
            write_jsonl(heldout_tmp / f"{domain}.jsonl", heldout[domain])
    write_json(REPORT, report)
    for domain, counts in report["domains"].items():
        print(f"corpus: {domain:14s} {counts['documents']:6,} documents {counts['characters']:11,} characters "
              f"(+{counts['heldout_documents']} held out)")
    t = report["total"]
    print(f"corpus: {'total':14s} {t['documents']:6,} documents {t['characters']:11,} characters "
          f"(+{t['heldout_documents']} held out, {t['dropped_duplicates']} duplicates removed)")


if __name__ == "__main__":
    from shear.stage import run_stage

    run_stage(__doc__, main)
