"""Sheared pruning (prune.method=sheared): learn hard-concrete masks on data/models/base towards
prune.target, then cut it to exactly that shape in data/models/pruned/.

Checkpoints go to data/checkpoints/prune (a re-run with the same params resumes), DVCLive
logs to reports/train/prune. With dynamic batch loading (data.mixture: auto or dynamic) the
domain weights follow each domain's held-out loss above the base model's
(reports/eval/base/metrics.json).

Several processes: set `prune.sheared.num_processes` and the stage re-executes itself under
`accelerate launch` (gloo processes on CPU), like `retrain.num_processes`: with
configs/accelerate/fsdp.yaml (FSDP2, the model sharded) when `prune.sheared.sharding` is fsdp,
or auto and the memory plan (shear.plan) says one device cannot hold the unsharded run;
else with ddp.yaml (a full copy per process). The global batch is batch_size x grad_accum x
num_processes rows; a checkpoint resumes on another number of processes when batch_size x
num_processes (the rows drawn per micro-batch) and grad_accum are unchanged, and across
sharding modes (an FSDP checkpoint is sharded safetensors that torch reassembles for any
process count).
"""
import dataclasses
import time

from shear.config import HELDOUT_SEQ_LEN
from shear.data import load_domains, load_manifest
from shear.errors import ShearError
from shear.io import model_digest, recover_dir, run_hash
from shear.mixture import build_sampler, heldout_rows, plot_weights, reference_losses
from shear.models import architecture, count_parameters, layout, load_model, pick_device, save_model
from shear.paths import BASE_METRICS, BASE_MODEL, PRUNE_CHECKPOINTS, PRUNE_LOGS, PRUNED_MODEL, SHARDS
from shear.plan import check_stage
from shear.prune.l0 import L0Masks
from shear.prune.shapes import resolve_target
from shear.prune.sheared import prune_sheared
from shear.records import MixtureRecord
from shear.trainer import (check_seq_len, check_train_tokens, launched, make_accelerator, open_live, plan_run,
                           read_checkpoint, relaunch)



def main(params, args):
    prune, sheared, mixture, seed = params.prune, params.prune.sheared, params.mixture, params.run.seed
    started = time.perf_counter()
    recover_dir(PRUNED_MODEL)  # a run killed while replacing the output left it aside: put it back
    memory = check_stage("prune", params, BASE_MODEL, pick_device(params.run.device))
    if sheared.num_processes > 1 and not launched():
        # The checks that need no model, before paying for N processes.
        plan_run("prune.sheared", sheared.tokens, sheared.batch_size, sheared.seq_len, sheared.grad_accum,
                 sheared.num_processes, sheared.lr_warmup_fraction)
        if relaunch("stages.prune_sheared", sheared.num_processes, args.params, fsdp=memory.sharded) != 0:
            raise ShearError("prune: a sheared pruning process failed (its error is printed above)")
        return

    # Everything is validated before the first write: a failing run leaves the previous
    # outputs, checkpoint and learning curves as they were.
    accelerator = make_accelerator(params.run.device, params.run.dtype)
    is_main = accelerator.is_main_process
    plan = plan_run("prune.sheared", sheared.tokens, sheared.batch_size, sheared.seq_len, sheared.grad_accum,
                    accelerator.num_processes, sheared.lr_warmup_fraction)
    model, tokenizer, base_record = load_model(BASE_MODEL)
    check_seq_len("prune.sheared", sheared.seq_len, model.config)
    target_keys = {k: v for k, v in dataclasses.asdict(prune.target).items() if k != "align" and v is not None}
    target = resolve_target(model.config, target_keys, prune.target.align, prune.target.tp_divisible)
    masks = L0Masks(architecture(model.config), target, temperature=sheared.temperature, seed=seed,
                    layout=layout(model.config))

    domains = load_domains(SHARDS, "train", tokenizer)
    check_train_tokens("prune.sheared", domains, sheared.seq_len, SHARDS)
    kind = params.mixture_kind()
    dynamic = kind == "dynamic"
    reference = reference_losses(BASE_METRICS, mixture.reference_loss, list(domains), HELDOUT_SEQ_LEN) \
        if dynamic else None
    sampler = build_sampler(kind, domains, sheared.seq_len, seed, params.data.domain_weights,
                            reference, mixture.eta, mixture.smoothing)
    if dynamic:
        check_seq_len("prune.sheared (held-out rows)", HELDOUT_SEQ_LEN, model.config)
    ev = params.evaluate  # the reference's protocol: the same rows and batching, so Δ = 0 for the unpruned model
    heldout = heldout_rows(SHARDS, tokenizer, None, HELDOUT_SEQ_LEN, max_tokens=ev.ppl_max_tokens,
                           seq_lens=ev.ppl_seq_lens, batch_size=ev.batch_size,
                           max_positions=model.config.max_position_embeddings) if dynamic else None

    # Everything that defines the run: a checkpoint from any other run is not resumed. The
    # process count and sharding are not part of it as such: the same rows per draw and
    # grad_accum give the same global batches on any number of processes, DDP or FSDP.
    fingerprint = run_hash({
        "sheared": {k: v for k, v in dataclasses.asdict(sheared).items()
                    if k not in ("checkpoint_every", "num_processes", "batch_size", "activation_checkpointing",
                                 "sharding")},
        "checkpoint_layout": 2,  # the masks' optimizer apart from the weights' (older checkpoints: afresh)
        "rows_per_draw": plan.batch_size * plan.world_size,
        "target": target, "data": {**dataclasses.asdict(params.data), "mixture": kind},
        "mixture": dataclasses.asdict(mixture) if dynamic else None, "reference": reference,
        "heldout": {k: getattr(params.evaluate, k) for k in ("ppl_max_tokens", "ppl_seq_lens", "batch_size")}
        if dynamic else None,
        "seed": seed, "device": accelerator.device.type, "base": model_digest(BASE_MODEL),
        "shards": load_manifest(SHARDS),
    })
    resume = read_checkpoint(PRUNE_CHECKPOINTS, fingerprint, "sheared", announce=is_main, stream=True)
    live = open_live(PRUNE_LOGS, resume["step"] if resume is not None else None) if is_main else None
    before = count_parameters(model)
    pruned, record = prune_sheared(
        model, masks, sampler, plan, accelerator, lr_model=sheared.lr_model, lr_mask=sheared.lr_mask,
        lr_lambda=sheared.lr_lambda, lagrangian_warmup_fraction=sheared.lagrangian_warmup_fraction,
        checkpoint_every=sheared.checkpoint_every, checkpoint_dir=PRUNE_CHECKPOINTS, fingerprint=fingerprint, live=live,
        resume=resume, seed=seed, heldout=heldout, update_every=mixture.update_every,
        activation_checkpointing=sheared.activation_checkpointing)
    if is_main:
        live.end()
        if dynamic:
            plot_weights(sampler, PRUNE_LOGS / "mixture_weights.png", mixture.update_every)
        info = save_model(pruned, tokenizer, PRUNED_MODEL, {
            **record, "source": base_record.get("source"),
            "mixture": MixtureRecord(kind=kind, **record["mixture"]).to_dict(),
            "parameters_before": before, "wall_s": round(time.perf_counter() - started, 1),
        })
        after = info["parameters"]
        print(f"prune: sheared {plan.total_steps} steps on {plan.world_size} process(es), {record['training']['sharding']} -> "
              f"{', '.join(f'{k}={v}' for k, v in target.items())}: "
              f"{before['non_embedding']:,} -> {after['non_embedding']:,} non-embedding parameters "
              f"({time.perf_counter() - started:.0f} s)")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    from shear.models import return_freed_memory
    from shear.stage import run_stage

    return_freed_memory()  # a training stage: its peak RSS is what shear.plan counts (see the docstring)
    run_stage(__doc__, main)
