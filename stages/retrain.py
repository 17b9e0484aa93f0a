"""Stage `retrain`: LoRA | CPT | none on data/models/pruned, optionally distilled from
data/models/base (logits, and hidden states mapped by the blocks pruned/shear.json says were
kept), -> data/models/retrained/ (a plain checkpoint: LoRA is merged).

With a dynamic mixture after sheared pruning, the domain weights start where the pruning run's
ended (`mixture.final_weights` of data/models/pruned/shear.json), as in Sheared-LLaMA.

Also writes data/checkpoints/retrain/last/ every retrain.checkpoint_every steps (a DVC
`persist` output: re-running the stage with the same params resumes from it; a checkpoint of
other params is ignored) and DVCLive logs in reports/train/retrain/ (`dvc plots show`).

Multi-GPU, one machine: set `retrain.num_processes` and run the stage as usual,

    dvc exp run -S retrain.num_processes=8          # or python -m stages.retrain

and it re-executes itself under accelerate, DDP for LoRA, FSDP for CPT on CUDA (gloo DDP
on CPU, both methods):

    accelerate launch --config_file configs/accelerate/<ddp|fsdp>.yaml --num_processes 8 \\
        --num_machines 1 --main_process_port <a free port> -m stages.retrain

Several machines: start the stage under accelerate on every node yourself (a stage that
is already launched, LOCAL_RANK set, does not re-launch and trains with the launcher's
world size). Every node needs the same params.yaml and data/ (models, shards, and on a
resume the checkpoint: use a shared filesystem); only global rank 0 writes. For 2 nodes x
8 GPUs, with node 0 at 10.0.0.1:

    accelerate launch --config_file configs/accelerate/fsdp.yaml \\
        --num_machines 2 --machine_rank 0 --main_process_ip 10.0.0.1 --main_process_port 29500 \\
        --num_processes 16 -m stages.retrain          # on node 1: --machine_rank 1

then `dvc commit retrain` on node 0 records the outputs in dvc.lock.
"""
import dataclasses
import shutil

import torch

from shear.config import HELDOUT_SEQ_LEN
from shear.data import load_domains, load_manifest
from shear.distill import block_map
from shear.errors import ShearError
from shear.io import atomic_dir, model_digest, recover_dir, run_hash, write_json
from shear.mixture import (build_sampler, continued_weights, domain_losses, heldout_rows, plot_weights,
                           reference_losses)
from shear.models import load_model, pick_device, resolve_dtype, save_model
from shear.paths import (BASE_METRICS, BASE_MODEL, PRUNED_MODEL, RETRAIN_CHECKPOINTS, RETRAIN_LOGS, RETRAINED_MODEL,
                         SHARDS)
from shear.plan import check_stage
from shear.train import apply_lora, load_teacher, require_teacher, train
from shear.trainer import (check_seq_len, check_train_tokens, launched, make_accelerator, open_live, plan_run,
                           read_checkpoint, relaunch)


def heldout(params, tokenizer, config, dynamic: bool):
    """The held-out rows of the run's loss: all of the evaluate stage's 128-token rows for a dynamic
    mixture (its reference's own, so the excess loss of an unchanged model is 0), the first
    mixture.eval_sequences of them otherwise (a logged loss only)."""
    ev = params.evaluate
    return heldout_rows(SHARDS, tokenizer, None if dynamic else params.mixture.eval_sequences, HELDOUT_SEQ_LEN,
                        max_tokens=ev.ppl_max_tokens, seq_lens=ev.ppl_seq_lens, batch_size=ev.batch_size,
                        max_positions=config.max_position_embeddings)


def copy_pruned(params) -> None:
    """Method `none`: the pruned model unchanged, with its held-out loss logged for the report."""
    device = pick_device(params.run.device)
    model, tokenizer, record = load_model(PRUNED_MODEL, dtype=resolve_dtype(params.run.dtype, device), device=device)
    losses = domain_losses(model, heldout(params, tokenizer, model.config, dynamic=False))
    with atomic_dir(RETRAINED_MODEL) as tmp:
        for f in PRUNED_MODEL.iterdir():
            if f.name != "shear.json":
                shutil.copy2(f, tmp / f.name)
        write_json(tmp / "shear.json", {**record, "retrain": {"method": "none", "tokens": 0, "loss_after": losses}})
    live = open_live(RETRAIN_LOGS, None)
    for domain, value in losses.items():
        live.log_metric(f"eval/loss/{domain}", value)
    live.end()
    print(f"retrain: method none, copied {PRUNED_MODEL} -> {RETRAINED_MODEL}")


def main(params, args):
    retrain = params.retrain
    recover_dir(RETRAINED_MODEL)  # a run killed while replacing the output left it aside: put it back
    if retrain.method == "none":
        copy_pruned(params)
        return
    check_stage("retrain", params, PRUNED_MODEL, pick_device(params.run.device))
    if retrain.num_processes > 1 and not launched():
        # The checks that need no model, before paying for N processes.
        plan_run("retrain", retrain.tokens, retrain.batch_size, retrain.seq_len, retrain.grad_accum,
                 retrain.num_processes, retrain.warmup_fraction)
        if retrain.needs_teacher:
            require_teacher(BASE_MODEL)
        fsdp = retrain.method == "cpt" and pick_device(params.run.device).type == "cuda"
        if relaunch("stages.retrain", retrain.num_processes, args.params, fsdp=fsdp) != 0:
            raise ShearError("retrain: a training process failed (its error is printed above)")
        return

    # Everything is validated before the first write: a failing run leaves the previous
    # outputs, checkpoint and learning curves as they were.
    accelerator = make_accelerator(params.run.device, params.run.dtype)
    is_main = accelerator.is_main_process
    plan_run("retrain", retrain.tokens, retrain.batch_size, retrain.seq_len, retrain.grad_accum,
             accelerator.num_processes, retrain.warmup_fraction)
    if retrain.needs_teacher:
        require_teacher(BASE_MODEL)
    # LoRA: the frozen base in the run dtype (bf16 on CUDA), peft's adapters float32; CPT trains
    # every weight, so it keeps float32 master weights and computes under bf16 autocast
    dtype = resolve_dtype(params.run.dtype, accelerator.device) if retrain.method == "lora" else torch.float32
    model, tokenizer, record = load_model(PRUNED_MODEL, dtype=dtype)
    check_seq_len("retrain", retrain.seq_len, model.config)
    check_seq_len("retrain (held-out rows)", HELDOUT_SEQ_LEN, model.config)
    domains = load_domains(SHARDS, "train", tokenizer)  # refuses shards of another tokenizer
    check_train_tokens("retrain", domains, retrain.seq_len, SHARDS)
    teacher = load_teacher(BASE_MODEL, model, accelerator.device, params.run.dtype) if retrain.needs_teacher else None
    mapping = (block_map(record, teacher.config, model.config, f"{PRUNED_MODEL}/shear.json")
               if retrain.distill_hidden > 0 else None)
    if mapping is not None and model.config.hidden_size != teacher.config.hidden_size and \
            accelerator.distributed_type.name == "FSDP":
        # the learned width map lives outside the sharded model, which FSDP's checkpoints and clipping cannot hold
        raise ShearError(f"retrain.distill_hidden > 0 on a narrower pruned model (hidden {model.config.hidden_size} "
                         f"< {teacher.config.hidden_size}) is not supported under FSDP (cpt on several GPUs); "
                         "set retrain.num_processes: 1 or retrain.method: lora")

    kind = params.mixture_kind()
    dynamic = kind == "dynamic"
    mixture = params.mixture
    reference = reference_losses(BASE_METRICS, mixture.reference_loss, list(domains), HELDOUT_SEQ_LEN) if dynamic else None
    # A dynamic mixture continues where the sheared pruning run's ended (Sheared-LLaMA), else
    # starts from data.domain_weights (empty: proportional to size).
    start = continued_weights(record, f"{PRUNED_MODEL}/shear.json", list(domains)) if dynamic else None
    sampler = build_sampler(kind, domains, retrain.seq_len, params.run.seed, start or params.data.domain_weights,
                            reference, mixture.eta, mixture.smoothing)
    rows = heldout(params, tokenizer, model.config, dynamic)
    if retrain.method == "lora":
        model = apply_lora(model, retrain.lora.r, retrain.lora.alpha, retrain.lora.dropout, retrain.lora.target_modules)

    # What defines the final weights; checkpoint_every and eval_every do not, num_processes
    # counts through the actual world size.
    settings = {
        "retrain": {k: v for k, v in dataclasses.asdict(retrain).items()
                    if k not in ("checkpoint_every", "eval_every", "num_processes", *{"lora", "cpt"} - {retrain.method})},
        "data": {**dataclasses.asdict(params.data), "mixture": kind},
        "mixture": dataclasses.asdict(mixture) if dynamic else None,
        "start_weights": start,  # the pruning run's final weights are in shear.json, not in model_digest
        "evaluate": {k: getattr(params.evaluate, k) for k in ("ppl_max_tokens", "ppl_seq_lens", "batch_size")},
        "seed": params.run.seed,
        "world_size": accelerator.num_processes,
        "model": model_digest(PRUNED_MODEL),
        "teacher": model_digest(BASE_MODEL) if teacher is not None else None,
        "shards": load_manifest(SHARDS),
    }
    run_id = run_hash(settings)
    resume = read_checkpoint(RETRAIN_CHECKPOINTS, run_id, "retrain", announce=is_main, stream=True)

    live = open_live(RETRAIN_LOGS, resume["step"] if resume is not None else None) if is_main else None
    trained, summary = train(
        model, sampler, retrain, accelerator, teacher=teacher, mapping=mapping, eval_rows=rows,
        update_every=mixture.update_every if dynamic else None, live=live, checkpoint_dir=RETRAIN_CHECKPOINTS,
        run_id=run_id, resume=resume, seed=params.run.seed,
    )
    if is_main:
        save(params, kind, trained, tokenizer, record, summary, sampler, live)
    accelerator.wait_for_everyone()
    accelerator.end_training()


def save(params, kind, trained, tokenizer, record, summary, sampler, live) -> None:
    """Rank 0: the retrained model with what was done in its shear.json, the mixture plot, the logs."""
    retrain, mixture = params.retrain, params.mixture
    summary |= {
        "distill": retrain.distill, "distill_temperature": retrain.distill_temperature,
        "distill_hidden": retrain.distill_hidden, "distill_hidden_loss": retrain.distill_hidden_loss, "lr": retrain.lr,
        "batch_size": retrain.batch_size, "seq_len": retrain.seq_len, "grad_accum": retrain.grad_accum,
        "mixture": kind,
    }
    summary[retrain.method] = dataclasses.asdict(retrain.recipe)  # lora: adapters and optimizer; cpt: optimizer
    if kind == "dynamic":
        summary["mixture_initial_weights"] = dict(sampler.initial_weights)
        # In DVCLive's images folder, which a fresh (not resumed) run clears.
        plot_weights(sampler, RETRAIN_LOGS / "plots" / "images" / "mixture_weights.png", mixture.update_every)
    save_model(trained, tokenizer, RETRAINED_MODEL, {**record, "retrain": summary})  # architecture and counts are refreshed
    live.end()
    before, after = summary["loss_before"], summary["loss_after"]
    print(f"retrain: {retrain.method} {summary['tokens']:,} tokens in {summary['steps']} steps, "
          f"{summary['train_s']} s; held-out loss {before.get('mean', float('nan')):.4f} -> "
          f"{after.get('mean', float('nan')):.4f} -> {RETRAINED_MODEL}")


if __name__ == "__main__":
    from shear.models import return_freed_memory
    from shear.stage import run_stage

    return_freed_memory()  # a training stage: its peak RSS is what shear.plan counts (see the docstring)
    run_stage(__doc__, main)
