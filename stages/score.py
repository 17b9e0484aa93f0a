"""Stage `score`: block and width importance of data/models/base on the calibration set.

Block scores (a few numbers each) and width-score summaries, with their plots, go to
reports/scores/ (in git); the width score tensors to data/scores/*.safetensors (DVC-cached:
at 7B they are megabytes per criterion), which width pruning reads.

When the memory plan says the model does not fit the device (or score.layerwise: true), the
scores are computed one block at a time from the safetensors files (shear.importance.layerwise).
"""
from shear.data import calibration_batch
from shear.importance.blocks import plot_block_scores, removed_by, score_blocks
from shear.importance.layerwise import (
    CheckpointBlocks,
    check_layerwise_criteria,
    layerwise_width_scores,
    score_blocks_layerwise,
)
from shear.importance.width import write_width_scores
from shear.io import atomic_dir, write_json
from shear.models import block_parameters, load_model, pick_device, resolve_dtype
from shear.paths import BASE_MODEL, SCORE_TENSORS, SCORES, SHARDS
from shear.plan import check_stage
from shear.prune.depth import blocks_to_remove


def main(params, args):
    score, depth = params.score, params.prune.depth
    device = pick_device(params.run.device)
    layerwise = check_stage("score", params, BASE_MODEL, device).layerwise
    dtype = resolve_dtype(params.run.dtype, device)
    if layerwise:
        check_layerwise_criteria(score.block_criteria, score.width_criteria)
        model = CheckpointBlocks(BASE_MODEL, dtype, device)
        tokenizer, skeleton = model.tokenizer(), model.skeleton
        score_fn, width_fn = score_blocks_layerwise, layerwise_width_scores
        print(f"score: layer by layer ({BASE_MODEL} does not fit the device, or score.layerwise: true)")
    else:
        model, tokenizer, _ = load_model(BASE_MODEL, dtype=dtype, device=device)
        skeleton, score_fn, width_fn = model, score_blocks, None
    calib = calibration_batch(SHARDS, score.calib_sequences, score.calib_seq_len, tokenizer)
    L = skeleton.config.num_hidden_layers
    # angular's span length and sleb's steps: the number of blocks depth pruning removes
    n = blocks_to_remove(L, block_parameters(skeleton), depth.ratio, depth.num_blocks)
    memo = {}
    with atomic_dir(SCORES) as tmp, atomic_dir(SCORE_TENSORS) as tensors:
        for criterion in score.block_criteria:
            record = score_fn(model, calib, criterion, n=n, batch_size=score.batch_size,
                              keep_first=score.keep_first, keep_last=score.keep_last, seed=params.run.seed, memo=memo)
            write_json(tmp / f"block_{criterion}.json", record)
            plot_block_scores(record, tmp / f"block_{criterion}.png")
            print(f"score: {criterion:9s} removes blocks {removed_by(record)} of {L}")
        for criterion in score.width_criteria:
            # whole-model taylor: computed with the block taylor scores, from the same backward pass
            scores = width_fn(model, calib, criterion, score.batch_size) if width_fn else memo.get(f"width_{criterion}")
            write_width_scores(skeleton, calib, criterion, tmp, tensors, score.batch_size, scores=scores)
            print(f"score: width {criterion} written")


if __name__ == "__main__":
    from shear.stage import run_stage

    run_stage(__doc__, main)
