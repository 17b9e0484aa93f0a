"""Stage `retrain`: LoRA | CPT | none on data/models/pruned, optionally distilled from
data/models/base, -> data/models/retrained/ (a plain checkpoint: LoRA is merged).

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
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path


from shear.data import load_domains, load_manifest
from shear.errors import ShearError
from shear.io import atomic_dir, run_hash, trim_logs, write_json
from shear.mixture import build_sampler, domain_losses, heldout_rows, plot_weights, reference_losses
from shear.models import load_model, pick_device, save_model
from shear.train import (apply_lora, check_train_tokens, load_teacher, make_accelerator, model_digest,
                         read_checkpoint, require_teacher, steps_for_budget, train)

PRUNED, BASE, SHARDS = "data/models/pruned", "data/models/base", "data/shards"
OUT, CHECKPOINTS, LOGS = "data/models/retrained", "data/checkpoints/retrain", "reports/train/retrain"
BASE_METRICS = "reports/eval/base/metrics.json"
EVAL_SEQ_LEN = 128  # held-out loss length: the reference losses of the evaluate stage are at 128 tokens
ACCELERATE_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "accelerate"


def relaunch(params, args) -> int:
    """Run this stage again under `accelerate launch` with retrain.num_processes processes."""
    retrain = params.retrain
    fsdp = retrain.method == "cpt" and pick_device(params.run.device).type == "cuda"
    with socket.socket() as sock:  # a free port, so two runs on one machine do not collide
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", str(ACCELERATE_CONFIGS / ("fsdp.yaml" if fsdp else "ddp.yaml")),
           "--num_processes", str(retrain.num_processes), "--num_machines", "1", "--main_process_port", str(port),
           "-m", "stages.retrain", "--params", args.params]
    print("retrain: " + " ".join(cmd[1:]), flush=True)
    return subprocess.run(cmd).returncode


def copy_pruned(params) -> None:
    """Method `none`: the pruned model unchanged, with its held-out loss logged for the report."""
    from dvclive import Live

    model, tokenizer, record = load_model(PRUNED)
    losses = domain_losses(model, heldout_rows(SHARDS, tokenizer, params.mixture.eval_sequences, EVAL_SEQ_LEN))
    with atomic_dir(OUT) as tmp:
        for f in Path(PRUNED).iterdir():
            if f.name != "shear.json":
                shutil.copy2(f, tmp / f.name)
        write_json(tmp / "shear.json", {**record, "retrain": {"method": "none", "tokens": 0, "loss_after": losses}})
    live = Live(dir=LOGS, dvcyaml=None, save_dvc_exp=False, report=None)
    for domain, value in losses.items():
        live.log_metric(f"eval/loss/{domain}", value)
    live.end()
    print(f"retrain: method none, copied {PRUNED} -> {OUT}")


def main(params, args):
    retrain = params.retrain
    if retrain.method == "none":
        copy_pruned(params)
        return
    if retrain.num_processes > 1 and "LOCAL_RANK" not in os.environ:
        # The checks that need no model, before paying for N processes.
        steps_for_budget(retrain.tokens, retrain.batch_size, retrain.seq_len, retrain.grad_accum, retrain.num_processes)
        if retrain.distill > 0:
            require_teacher(BASE)
        if relaunch(params, args) != 0:
            raise ShearError("retrain: a training process failed (its error is printed above)")
        return

    accelerator = make_accelerator(params.run.device)
    is_main = accelerator.is_main_process
    model, tokenizer, record = load_model(PRUNED)
    domains = load_domains(SHARDS, "train", tokenizer)  # refuses shards of another tokenizer
    check_train_tokens(domains, retrain.seq_len, SHARDS)
    teacher = load_teacher(BASE, model, accelerator.device) if retrain.distill > 0 else None

    kind = params.mixture_kind()
    dynamic = kind == "dynamic"
    mixture = params.mixture
    reference = reference_losses(BASE_METRICS, mixture.reference_loss, list(domains), EVAL_SEQ_LEN) if dynamic else None
    sampler = build_sampler(kind, domains, retrain.seq_len, params.run.seed, params.data.domain_weights,
                            reference, mixture.eta, mixture.smoothing)
    rows = heldout_rows(SHARDS, tokenizer, mixture.eval_sequences, EVAL_SEQ_LEN)
    if retrain.method == "lora":
        model = apply_lora(model, retrain.lora.r, retrain.lora.alpha, retrain.lora.dropout, retrain.lora.target_modules)

    # What defines the final weights; checkpoint_every and eval_every do not, num_processes
    # counts through the actual world size.
    settings = {
        "retrain": {k: v for k, v in dataclasses.asdict(retrain).items()
                    if k not in ("checkpoint_every", "eval_every", "num_processes")},
        "data": {**dataclasses.asdict(params.data), "mixture": kind},
        "mixture": dataclasses.asdict(mixture) if dynamic else None,
        "seed": params.run.seed,
        "world_size": accelerator.num_processes,
        "model": model_digest(PRUNED),
        "teacher": model_digest(BASE) if teacher is not None else None,
        "shards": load_manifest(SHARDS),
    }
    run_id = run_hash(settings)
    resume = read_checkpoint(CHECKPOINTS, run_id, announce=is_main)

    live = None
    if is_main:
        from dvclive import Live

        if resume is not None:
            trim_logs(LOGS, resume["step"])
        live = Live(dir=LOGS, resume=resume is not None, dvcyaml=None, save_dvc_exp=False, report=None)
    trained, summary = train(
        model, sampler, retrain, accelerator, teacher=teacher, eval_rows=rows,
        update_every=mixture.update_every if dynamic else None, live=live, checkpoint_dir=CHECKPOINTS,
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
        "distill": retrain.distill, "distill_temperature": retrain.distill_temperature, "lr": retrain.lr,
        "batch_size": retrain.batch_size, "seq_len": retrain.seq_len, "grad_accum": retrain.grad_accum,
        "mixture": kind,
    }
    if retrain.method == "lora":
        summary["lora"] = dataclasses.asdict(retrain.lora)
    if kind == "dynamic":
        # In DVCLive's images folder, which a fresh (not resumed) run clears.
        plot_weights(sampler, Path(LOGS) / "plots" / "images" / "mixture_weights.png", mixture.update_every)
    save_model(trained, tokenizer, OUT, {**record, "retrain": summary})  # architecture and counts are refreshed
    live.end()
    before, after = summary["loss_before"], summary["loss_after"]
    print(f"retrain: {retrain.method} {summary['tokens']:,} tokens in {summary['steps']} steps, {summary['train_s']} s; "
          f"held-out loss {before.get('mean', float('nan')):.4f} -> {after.get('mean', float('nan')):.4f} -> {OUT}")


if __name__ == "__main__":
    from shear.stage import run_stage

    run_stage(__doc__, main)
