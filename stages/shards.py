"""Stage `shards`: tokenize data/raw/<domain>.jsonl, split by document, pack into data/shards/."""
from transformers import AutoTokenizer

from shear.config import HELDOUT_SEQ_LEN
from shear.data import build_shards
from shear.errors import ShearError
from shear.paths import BASE_MODEL, RAW, SHARDS


def main(params, args):
    try:
        tokenizer = AutoTokenizer.from_pretrained(BASE_MODEL)
    except (OSError, ValueError):
        raise ShearError(f"{BASE_MODEL}: no tokenizer here; run the base stage first") from None
    shards = params.shards
    # Every domain must give one held-out row of the shortest perplexity length and of the
    # 128-token held-out loss (retraining, dynamic mixture) or a later stage fails on it.
    min_eval_tokens = max(HELDOUT_SEQ_LEN, min(params.evaluate.ppl_seq_lens, default=0))
    manifest = build_shards(RAW, tokenizer, SHARDS, shards.seq_len, shards.calib_fraction, shards.eval_fraction,
                            shards.max_tokens_per_domain, params.run.seed, min_eval_tokens)
    for domain, splits in manifest["domains"].items():
        print(f"shards: {domain:14s} " + "  ".join(f"{k}={v['tokens']:,}" for k, v in splits.items()))


if __name__ == "__main__":
    from shear.stage import run_stage

    run_stage(__doc__, main)
