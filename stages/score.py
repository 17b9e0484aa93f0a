"""Stage `score`: block and width importance of data/models/base on the calibration set -> reports/scores/."""
from pathlib import Path

from shear.data import calibration_batch
from shear.importance.blocks import plot_block_scores, removed_by, score_blocks
from shear.importance.width import write_width_scores
from shear.io import atomic_dir, write_json
from shear.models import block_parameters, load_model, pick_device
from shear.prune.depth import blocks_to_remove

BASE, SHARDS, OUT = "data/models/base", "data/shards", Path("reports/scores")


def main(params, args):
    score, depth = params.score, params.prune.depth
    device = pick_device(params.run.device)
    model, tokenizer, _ = load_model(BASE, device=device)
    calib = calibration_batch(SHARDS, score.calib_sequences, score.calib_seq_len, tokenizer)
    L = model.config.num_hidden_layers
    # angular's span length and sleb's steps: the number of blocks depth pruning removes
    n = blocks_to_remove(L, block_parameters(model), depth.ratio, depth.num_blocks)
    memo = {}
    with atomic_dir(OUT) as tmp:
        for criterion in score.block_criteria:
            record = score_blocks(model, calib, criterion, n=n, batch_size=score.batch_size,
                                  keep_first=score.keep_first, keep_last=score.keep_last, seed=params.run.seed,
                                  memo=memo)
            write_json(tmp / f"block_{criterion}.json", record)
            plot_block_scores(record, tmp / f"block_{criterion}.png")
            print(f"score: {criterion:9s} removes blocks {removed_by(record)} of {L}")
        for criterion in score.width_criteria:
            write_width_scores(model, calib, criterion, tmp, score.batch_size)
            print(f"score: width {criterion} written")


if __name__ == "__main__":
    from shear.stage import run_stage

    run_stage(__doc__, main)
