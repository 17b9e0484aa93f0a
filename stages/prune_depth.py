"""Depth pruning (prune.method=depth): remove the least important blocks of data/models/base.

one_shot: the n lowest-scoring unprotected blocks of reports/scores/block_<criterion>.json
(sleb: its greedy removal order). iterative: remove the lowest, re-score the smaller model
on the calibration set, repeat n times (sleb is iterative already and keeps its order).
"""
from shear.data import calibration_batch
from shear.errors import ShearError
from shear.importance.blocks import block_scores
from shear.io import read_json
from shear.models import block_parameters, count_parameters, load_model, pick_device, resolve_dtype, save_model
from shear.paths import BASE_MODEL, PRUNED_MODEL, SCORES, SHARDS
from shear.plan import check_stage
from shear.prune.depth import (blocks_to_remove, check_protected, prune_iterative, protected_blocks, remove_blocks,
                               select_blocks, target_setting)


def main(params, args):
    depth, score = params.prune.depth, params.score
    device = pick_device(params.run.device)
    check_stage("prune", params, BASE_MODEL, device)
    model, tokenizer, base_record = load_model(BASE_MODEL, dtype=resolve_dtype(params.run.dtype, device), device=device)
    L = model.config.num_hidden_layers
    scores_path = SCORES / f"block_{depth.criterion}.json"
    record = read_json(scores_path)
    if len(record["scores"]) != L:
        raise ShearError(f"{scores_path}: scores {len(record['scores'])} blocks but {BASE_MODEL} has {L}; "
                         "re-run the score stage (dvc repro score)")
    n = blocks_to_remove(L, block_parameters(model), depth.ratio, depth.num_blocks)
    protected = protected_blocks(depth.criterion, L, score.keep_first, score.keep_last)
    check_protected(n, L, protected, depth.criterion, target_setting(depth.ratio, depth.num_blocks, n))
    before = count_parameters(model)

    steps = None
    if depth.mode == "one_shot" or depth.criterion == "sleb":
        removed = select_blocks(record, n, protected)
        remove_blocks(model, removed)
    else:
        calib = calibration_batch(SHARDS, score.calib_sequences, score.calib_seq_len, tokenizer)
        unprotected_criterion = depth.criterion.rstrip("+")  # protection is applied by original index below

        def rescore(m, k):
            return block_scores(m, calib, unprotected_criterion, n=k, batch_size=score.batch_size,
                                seed=params.run.seed)[0]

        removed, steps = prune_iterative(model, n, record["scores"], rescore, protected)

    info = save_model(model, tokenizer, PRUNED_MODEL, {
        "method": "depth",
        "source": base_record.get("source"),
        "criterion": depth.criterion,
        "mode": depth.mode,
        "removed_blocks": removed,
        "protected": protected,
        "scores": record["scores"],
        **({"removal_steps": steps} if steps is not None else {}),
        "parameters_before": before,
    })
    after = info["parameters"]
    print(f"prune: depth/{depth.criterion}/{depth.mode} removed blocks {removed} of {L}: "
          f"{before['total']:,} -> {after['total']:,} parameters")


if __name__ == "__main__":
    from shear.stage import run_stage

    run_stage(__doc__, main)
