"""Sheared pruning (prune.method=sheared): learn hard-concrete masks on data/models/base towards
prune.target, then cut it to exactly that shape in data/models/pruned/.

Checkpoints go to data/checkpoints/prune (a re-run with the same params resumes), DVCLive
logs to reports/train/prune. With dynamic batch loading (data.mixture: auto or dynamic) the
domain weights follow each domain's held-out loss above the base model's
(reports/eval/base/metrics.json).
"""
import dataclasses
import time
from pathlib import Path

from shear.data import load_domains, load_manifest
from shear.io import read_json, run_hash
from shear.mixture import build_sampler, heldout_rows, plot_weights, reference_losses
from shear.models import count_parameters, load_model, pick_device, save_model
from shear.prune.shapes import resolve_target
from shear.prune.sheared import prune_sheared

BASE, SHARDS, BASE_METRICS = "data/models/base", "data/shards", "reports/eval/base/metrics.json"
OUT, CHECKPOINTS, LOGS = "data/models/pruned", "data/checkpoints/prune", "reports/train/prune"


def main(params, args):
    prune, sheared, mixture, seed = params.prune, params.prune.sheared, params.mixture, params.run.seed
    started = time.perf_counter()
    device = pick_device(params.run.device)
    model, tokenizer, base_record = load_model(BASE)
    target_keys = {k: v for k, v in dataclasses.asdict(prune.target).items() if k != "align" and v is not None}
    target = resolve_target(model.config, target_keys, prune.target.align)

    domains = load_domains(SHARDS, "train", tokenizer)
    kind = params.mixture_kind()
    dynamic = kind == "dynamic"
    reference = reference_losses(BASE_METRICS, mixture.reference_loss, list(domains)) if dynamic else None
    sampler = build_sampler(kind, domains, sheared.seq_len, seed, params.data.domain_weights,
                            reference, mixture.eta, mixture.smoothing)
    heldout = heldout_rows(SHARDS, tokenizer, mixture.eval_sequences) if dynamic else None

    # Everything that defines the run: a checkpoint from any other run is not resumed.
    fingerprint = run_hash({
        "sheared": dataclasses.asdict(sheared), "target": target,
        "data": {**dataclasses.asdict(params.data), "mixture": kind},
        "mixture": dataclasses.asdict(mixture) if dynamic else None, "reference": reference,
        "seed": seed, "device": device.type, "base": read_json(f"{BASE}/shear.json"),
        "shards": load_manifest(SHARDS),
    })
    before = count_parameters(model)
    pruned, record = prune_sheared(
        model, target, sampler, tokens=sheared.tokens, batch_size=sheared.batch_size, lr_model=sheared.lr_model,
        lr_mask=sheared.lr_mask, lr_lambda=sheared.lr_lambda, warmup_fraction=sheared.lagrangian_warmup_fraction,
        temperature=sheared.temperature, checkpoint_every=sheared.checkpoint_every, checkpoint_dir=CHECKPOINTS,
        log_dir=LOGS, fingerprint=fingerprint, device=device, seed=seed, heldout=heldout,
        update_every=mixture.update_every)
    if dynamic:
        plot_weights(sampler, Path(LOGS) / "mixture_weights.png", mixture.update_every)
    info = save_model(pruned, tokenizer, OUT, {
        **record, "source": base_record.get("source"), "mixture": {**record["mixture"], "kind": kind},
        "parameters_before": before, "wall_s": round(time.perf_counter() - started, 1),
    })
    after = info["parameters"]
    print(f"prune: sheared {record['training']['steps']} steps -> {', '.join(f'{k}={v}' for k, v in target.items())}: "
          f"{before['non_embedding']:,} -> {after['non_embedding']:,} non-embedding parameters "
          f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    from shear.stage import run_stage

    run_stage(__doc__, main)
