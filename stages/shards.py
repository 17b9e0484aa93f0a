"""Stage `shards`: tokenize data/raw/<domain>.jsonl, split by document, pack into data/shards/."""
from transformers import AutoTokenizer

from shear.data import build_shards
from shear.errors import ShearError

MODEL, RAW, OUT = "data/models/base", "data/raw", "data/shards"


def main(params, args):
    try:
        tokenizer = AutoTokenizer.from_pretrained(MODEL)
    except (OSError, ValueError):
        raise ShearError(f"{MODEL}: no tokenizer here; run the base stage first") from None
    shards = params.shards
    manifest = build_shards(RAW, tokenizer, OUT, shards.seq_len, shards.calib_fraction, shards.eval_fraction,
                            shards.max_tokens_per_domain, params.run.seed)
    for domain, splits in manifest["domains"].items():
        print(f"shards: {domain:14s} " + "  ".join(f"{k}={v['tokens']:,}" for k, v in splits.items()))


if __name__ == "__main__":
    from shear.stage import run_stage

    run_stage(__doc__, main)
