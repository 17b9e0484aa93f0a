"""Depth pruning (prune.method=depth): remove the least important blocks of data/models/base.

one_shot: the n lowest-scoring unprotected blocks of reports/scores/block_<criterion>.json
(sleb: its greedy removal order). iterative: remove the prune.depth.blocks_per_round lowest,
heal the smaller model with prune.depth.heal_tokens / rounds tokens of retraining (the
retrain section's method, optimizer and distillation, the retraining loop itself, LoRA
merged after every round), re-score it on the calibration set, repeat until n are gone
(sleb is iterative already and keeps its order; with healing or several blocks a round it
re-scores by ppl, SLEB's own step).

With healing, every round ends with a checkpoint in data/checkpoints/prune/last/ (the healed
weights, the sampler, the round records): a run killed while healing resumes after the last
finished round, and gives what an uninterrupted run gives; a checkpoint of other params, base
model, scores or shards is ignored. The output is written once, atomically, at the end.
"""
import dataclasses
import math

import torch

from shear.config import HELDOUT_SEQ_LEN, prune_settings
from shear.data import calibration_batch, load_domains, load_manifest
from shear.distill import BlockMap
from shear.errors import ShearError
from shear.importance.blocks import block_scores
from shear.io import file_digest, model_digest, read_json, run_hash
from shear.mixture import build_sampler, heldout_rows
from shear.models import block_parameters, count_parameters, load_model, pick_device, resolve_dtype, save_model
from shear.paths import BASE_MODEL, PRUNE_CHECKPOINTS, PRUNED_MODEL, SCORES, SHARDS
from shear.plan import check_stage
from shear.prune.depth import (blocks_to_remove, check_protected, prune_iterative, protected_blocks, remove_blocks,
                               select_blocks, target_setting)
from shear.train import apply_lora, load_teacher, train
from shear.trainer import check_seq_len, check_train_tokens, make_accelerator, read_checkpoint, save_checkpoint


def healing(params, model, tokenizer, rounds: int):
    """(heal, sampler): heal(model, round) gives `prune_iterative` its round's share of heal_tokens of
    retraining, drawn from one fixed-mixture sampler (each round reads the next batches).

    The budget buys whole optimizer steps, dealt out evenly (the first rounds get one more when
    they do not divide), so the rounds together spend heal_tokens rounded down to a step, not
    per round. Everything is checked here, before the first round: fewer steps than rounds,
    sequences longer than the model's positions, shards without one training row.
    """
    depth, retrain = params.prune.depth, params.retrain
    step = retrain.batch_size * retrain.seq_len * retrain.grad_accum  # one process: healing is not distributed
    steps = depth.heal_tokens // step
    if steps < rounds:
        raise ShearError(f"params.yaml: prune.depth.heal_tokens={depth.heal_tokens} pays for {steps} retrain steps of "
                         f"{step} tokens (retrain.batch_size x seq_len x grad_accum), fewer than the {rounds} rounds; "
                         f"set prune.depth.heal_tokens >= {rounds * step} or 0")
    check_seq_len("retrain", retrain.seq_len, model.config)
    domains = load_domains(SHARDS, "train", tokenizer)
    check_train_tokens("retrain", domains, retrain.seq_len, SHARDS)
    # Seeded apart from retraining's sampler (run.seed), which would walk the same shuffled rows
    # again: healing and the retraining after it read different rows, as one longer run does.
    sampler = build_sampler("fixed", domains, retrain.seq_len, params.run.seed + 1, params.data.domain_weights)
    rows = heldout_rows(SHARDS, tokenizer, params.mixture.eval_sequences, HELDOUT_SEQ_LEN)
    accelerator = make_accelerator(params.run.device, params.run.dtype)
    teacher = load_teacher(BASE_MODEL, model, accelerator.device, params.run.dtype) if retrain.needs_teacher else None
    device = model.device

    def heal(m, r, kept):
        torch.manual_seed(params.run.seed + r)  # LoRA's initial A: the same in a resumed run
        if retrain.method == "lora":
            m = apply_lora(m, retrain.lora.r, retrain.lora.alpha, retrain.lora.dropout, retrain.lora.target_modules)
        # returns a plain float32 CPU model, LoRA merged: the next round scores and cuts plain blocks
        share = steps // rounds + (r < steps % rounds)
        cfg = dataclasses.replace(retrain, tokens=share * step)
        # hidden-state distillation: each remaining block against the teacher block of its original index
        mapping = BlockMap(blocks=kept, channels=None) if retrain.distill_hidden > 0 else None
        healed, summary = train(m, sampler, cfg, accelerator, teacher=teacher, mapping=mapping, eval_rows=rows,
                                seed=params.run.seed + r)
        keep = ("method", "steps", "tokens", "loss_before", "loss_after", "train_s")
        return healed.to(device), {k: summary[k] for k in keep}

    return heal, sampler


def healing_run(params, scores_path) -> str:
    """The hash of what defines a prune-and-heal run: a checkpoint of another run is not resumed."""
    settings = prune_settings(params)
    # retrain.tokens is the budget after pruning; the others do not change the weights
    settings["retrain"] = {k: v for k, v in settings["retrain"].items()
                           if k not in ("tokens", "checkpoint_every", "eval_every", "num_processes")}
    return run_hash({"settings": settings, "base": model_digest(BASE_MODEL), "scores": file_digest([scores_path]),
                     "shards": load_manifest(SHARDS)})


def main(params, args):
    depth, score = params.prune.depth, params.score
    device = pick_device(params.run.device)
    check_stage("prune", params, BASE_MODEL, device)
    # healing trains these weights: float32 master weights then (bf16 compute comes from autocast)
    healing_on = depth.mode == "iterative" and depth.heal_tokens > 0
    dtype = torch.float32 if healing_on else resolve_dtype(params.run.dtype, device)
    model, tokenizer, base_record = load_model(BASE_MODEL, dtype=dtype, device=device)
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

    rounds = None
    sleb_order = depth.criterion == "sleb" and not depth.heal_tokens and depth.blocks_per_round == 1
    if depth.mode == "one_shot" or sleb_order:
        removed = select_blocks(record, n, protected)
        remove_blocks(model, removed)
    else:
        calib = calibration_batch(SHARDS, score.calib_sequences, score.calib_seq_len, tokenizer)
        # protection is applied by original index below; SLEB's step is the ppl criterion on the current model
        step_criterion = "ppl" if depth.criterion == "sleb" else depth.criterion.rstrip("+")

        def rescore(m, k):
            return block_scores(m, calib, step_criterion, n=k, batch_size=score.batch_size, seed=params.run.seed)[0]

        # a sleb record holds its greedy order, not the unpruned model's ppl scores: SLEB's first step is them
        first_scores = rescore(model, n) if depth.criterion == "sleb" else record["scores"]

        heal, checkpoint, done = None, None, []
        if depth.heal_tokens:
            heal, sampler = healing(params, model, tokenizer, math.ceil(n / depth.blocks_per_round))
            run_id = healing_run(params, scores_path)
            resume = read_checkpoint(PRUNE_CHECKPOINTS, run_id, "prune")
            if resume is not None:  # the model after the rounds done: base, their blocks removed, healed weights
                done = resume["rounds"]
                remove_blocks(model, [b for r in done for b in r["removed"]])
                model.load_state_dict(resume["weights"])
                sampler.load_state_dict(resume["sampler"])

            def checkpoint(m, rounds):
                save_checkpoint(PRUNE_CHECKPOINTS, run_id, len(rounds),
                                {"weights": m.state_dict(), "sampler": sampler.state_dict(), "rounds": rounds})

        model, removed, rounds = prune_iterative(model, n, first_scores, rescore, protected,
                                                 depth.blocks_per_round, heal, done, checkpoint)

    iterative = {}
    if rounds is not None:
        iterative = {"blocks_per_round": depth.blocks_per_round, "rounds": len(rounds), "removal_steps": rounds,
                     "heal_tokens": sum(r["heal"]["tokens"] for r in rounds if "heal" in r)}
    info = save_model(model, tokenizer, PRUNED_MODEL, {
        "method": "depth",
        "source": base_record.get("source"),
        "criterion": depth.criterion,
        "mode": depth.mode,
        "removed_blocks": removed,  # original indices (iterative: in removal order)
        "protected": protected,
        "scores": record["scores"],
        **iterative,
        "parameters_before": before,
    })
    after = info["parameters"]
    healed = f", healed with {iterative['heal_tokens']:,} tokens" if iterative.get("heal_tokens") else ""
    print(f"prune: depth/{depth.criterion}/{depth.mode} removed blocks {removed} of {L}{healed}: "
          f"{before['total']:,} -> {after['total']:,} parameters")


if __name__ == "__main__":
    from shear.stage import run_stage

    run_stage(__doc__, main)
