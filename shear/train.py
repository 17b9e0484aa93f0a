"""Retraining a pruned model: LoRA or full-parameter continued pre-training (CPT), optional
distillation from the unpruned model, a budget in tokens, checkpoints that resume exactly.

Shortened LLaMA (Kim et al. 2024): LoRA is enough at mild pruning, CPT wins at severe
pruning. Minitron (Muralidharan et al. 2024): distilling the logits of the model before
pruning beats plain next-token loss (the loss is in shear/distill.py).

One optimizer step, on each of the `world` processes:

    for each of grad_accum micro-batches (batch_size rows of seq_len tokens):
        forward (bf16 autocast on CUDA), loss, backward; the gradients are averaged
        across processes by DDP / FSDP on the last micro-batch only (`no_sync` before)
    clip the gradient norm, AdamW step at lr_at(step): linear warm-up, cosine decay

Every process draws the same global batch from one seeded sampler and keeps its own
slice, so the sampler's state is the same everywhere and rank 0 checkpoints it for all.

Distribution is `accelerate`'s (DDP, FSDP, gloo on CPU; see stages/retrain.py for the
launch); this module only calls `prepare`, `no_sync`, `backward`, `clip_grad_norm_` and
`reduce`. Checkpoints use `torch.distributed.checkpoint.state_dict`, which gathers a full
state dict from a plain, DDP or FSDP model alike: the trainable weights (the adapters for
LoRA), the optimizer, the sampler, every rank's RNG, the step and the run's hash (the
learning-rate schedule is a function of the step, so the step is all of its state).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from tqdm import tqdm

from shear import mixture
from shear.distill import retrain_loss
from shear.errors import ShearError
from shear.io import atomic_dir, read_json
from shear.models import pick_device

FINAL_LR_RATIO = 0.1  # cosine decay ends at 10% of the peak learning rate (LLaMA's schedule)


# ----------------------------------------------------------------------------- plan and checks


def steps_for_budget(tokens: int, batch_size: int, seq_len: int, grad_accum: int, world_size: int) -> int:
    """Optimizer steps the token budget pays for; a budget below one step is an error."""
    per_step = batch_size * seq_len * grad_accum * world_size
    if tokens < per_step:
        raise ShearError(
            f"params.yaml: retrain.tokens={tokens} is smaller than one optimizer step of {per_step} tokens "
            f"(batch_size {batch_size} x seq_len {seq_len} x grad_accum {grad_accum} x {world_size} processes); "
            f"set retrain.tokens >= {per_step} or a smaller batch"
        )
    return tokens // per_step


def check_train_tokens(domains: dict[str, np.ndarray], seq_len: int, shards_dir: str | Path) -> None:
    """Refuse shards in which no domain's train split holds one sequence of `seq_len` tokens."""
    largest = max((int(np.asarray(a).size) for a in domains.values()), default=0)
    if largest < seq_len:
        raise ShearError(
            f"{shards_dir}: no domain's train split holds one sequence of retrain.seq_len={seq_len} tokens "
            f"(the largest holds {largest}); lower retrain.seq_len or add text to the corpus"
        )


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then cosine decay to 10% of peak."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps - 1)
    floor = FINAL_LR_RATIO * peak
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


# ----------------------------------------------------------------------------- models


def lora_target_names(model) -> list[str]:
    """Names of the linear layers inside the transformer blocks: the valid LoRA targets."""
    return sorted({
        name.rsplit(".", 1)[-1]
        for name, module in model.model.layers.named_modules()
        if isinstance(module, torch.nn.Linear)
    })


def apply_lora(model, r: int, alpha: float, dropout: float, target_modules: list[str]):
    """Wrap `model` in a peft LoRA model (only the adapters train); unknown target names are refused."""
    from peft import LoraConfig, get_peft_model

    valid = lora_target_names(model)
    bad = [t for t in target_modules if t not in valid]
    if bad or not target_modules:
        what = f"has {bad[0]!r}, which is not a linear layer of this model" if bad else "is empty"
        raise ShearError(f"params.yaml: retrain.lora.target_modules {what}; valid: {', '.join(valid)}")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def require_teacher(directory: str | Path) -> None:
    """Distillation needs the unpruned base model on disk."""
    if not (Path(directory) / "config.json").is_file():
        raise ShearError(
            f"retrain.distill > 0 needs the teacher {directory} (the unpruned base model), which is missing; "
            "run the base stage (`dvc repro base`) or set retrain.distill: 0"
        )


def load_teacher(directory: str | Path, student, device: torch.device):
    """The frozen base model used as distillation teacher, on `device` (bf16 on CUDA)."""
    from shear.models import load_model

    require_teacher(directory)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    teacher, _, _ = load_model(directory, dtype=dtype, device=device)
    if teacher.config.vocab_size != student.config.vocab_size:
        raise ShearError(
            f"{directory}: teacher vocabulary ({teacher.config.vocab_size}) differs from the pruned model's "
            f"({student.config.vocab_size}); distillation needs the model the pruned one was cut from"
        )
    return teacher.eval().requires_grad_(False)


def make_optimizer(model, lr: float, betas: list[float], weight_decay: float, fused: Optional[bool]):
    """AdamW over the trainable parameters; matrices decay, vectors (norms, biases) do not."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=tuple(betas), fused=fused)


def make_accelerator(device: str = "auto"):
    """An `accelerate.Accelerator` for `run.device`: bf16 autocast on CUDA, gloo processes on CPU."""
    from accelerate import Accelerator

    cuda = pick_device(device).type == "cuda"
    return Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no")


# ----------------------------------------------------------------------------- run identity and checkpoints


def model_digest(directory: str | Path) -> str:
    """sha256 of a saved model's config and weights: a different start model is a different run."""
    h = hashlib.sha256()
    directory = Path(directory)
    for path in [directory / "config.json", *sorted(directory.glob("*.safetensors"))]:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def read_checkpoint(directory: str | Path, expected_hash: str, announce: bool = True) -> Optional[dict]:
    """The last checkpoint's state if it was made by the same run, else None (saying why)."""
    path = Path(directory) / "last"
    if not (path / "meta.json").is_file():
        return None
    meta = read_json(path / "meta.json")
    if meta.get("run_hash") != expected_hash:
        if announce:
            print(f"retrain: ignoring the checkpoint in {path} (step {meta.get('step')}): it was made with other "
                  f"params, start model or data (run hash {meta.get('run_hash')}, now {expected_hash}); starting afresh")
        return None
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as e:
        raise ShearError(f"{path}/state.pt: corrupt checkpoint ({str(e).splitlines()[0]}); delete {path} to start afresh") from None
    if announce:
        print(f"retrain: resuming from {path} at step {state['step']} of {meta.get('total_steps')}")
    return state


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _save_checkpoint(accelerator, directory, model, optimizer, sampler, meta: dict, extra: dict) -> None:
    """Gather the state on every rank (FSDP needs all of them), write it from rank 0, atomically."""
    from accelerate.utils import gather_object
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    model_state, optim_state = get_state_dict(model, optimizer.optimizer, options=options)
    rng = gather_object([_rng_state()])  # one entry per rank: dropout masks differ across ranks
    if accelerator.is_main_process:
        state = {"model": model_state, "optimizer": optim_state, "sampler": sampler.state_dict(),
                 "rng": rng, **extra, **meta}
        with atomic_dir(Path(directory) / "last") as tmp:
            torch.save(state, tmp / "state.pt")
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def _load_checkpoint(accelerator, state: dict, model, optimizer, sampler) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(full_state_dict=True, strict=False))
    sampler.load_state_dict(state["sampler"])
    _set_rng_state(state["rng"][accelerator.process_index])


# ----------------------------------------------------------------------------- the loop


def _final_model(accelerator, model, lora: bool):
    """The trained model as a plain CPU module on rank 0 (LoRA merged), None on other ranks."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        # The weights are sharded: gather a full state dict on rank 0 and load it into a fresh copy.
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from transformers import AutoModelForCausalLM

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not accelerator.is_main_process:
            return None
        # A real (not meta) model: non-persistent buffers such as RoPE's inv_freq are not in the state dict.
        fresh = AutoModelForCausalLM.from_config(accelerator.unwrap_model(model).config, dtype=torch.float32)
        fresh.load_state_dict(state)
        return fresh.eval()
    if not accelerator.is_main_process:
        return None
    model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    if lora:
        model = model.merge_and_unload()  # W + (alpha / r) B A, adapters gone: a plain checkpoint
    return model.to("cpu").float().eval()


def to_device(ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a batch to the GPU without a host sync: from pinned memory, asynchronously."""
    if device.type != "cuda":
        return ids
    # A copy from ordinary (pageable) memory makes the host wait for the GPU to drain.
    return ids.pin_memory().to(device, non_blocking=True)


def _eval_losses(model, rows: Optional[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Per-domain held-out loss plus their mean; rank 0's numbers on every rank."""
    from accelerate.utils import broadcast_object_list

    if not rows:
        return {}
    losses = mixture.domain_losses(model, rows)
    losses["mean"] = float(np.mean(list(losses.values())))
    return broadcast_object_list([losses])[0]


def _log(live, step: int, metrics: dict[str, float]) -> None:
    if live is None:
        return
    live.step = step
    for name, value in metrics.items():
        live.log_metric(name, float(value))


def train(model, sampler, cfg, accelerator, *, teacher=None, eval_rows=None, update_every: Optional[int] = None,
          live=None, checkpoint_dir: Optional[str | Path] = None, run_id: str = "", resume: Optional[dict] = None,
          seed: int = 0) -> tuple[Any, dict]:
    """Retrain `model` (already LoRA-wrapped for method lora) on batches from `sampler`.

    cfg: the `retrain` params section (RetrainParams). teacher: the frozen base model for
    `cfg.distill` > 0. eval_rows: held-out rows per domain, evaluated every cfg.eval_every
    steps and used by the dynamic mixture every `update_every` steps (None = fixed mixture).
    live: a DVCLive `Live` on rank 0, None elsewhere. checkpoint_dir / run_id: where and as
    which run to checkpoint every cfg.checkpoint_every steps; resume: a state from
    `read_checkpoint` to continue from.

    Returns (model, summary): the trained model as a plain CPU module with the LoRA
    adapters merged (None on ranks other than 0) and a summary dict for shear.json.
    """
    lora = cfg.method == "lora"
    world, rank = accelerator.num_processes, accelerator.process_index
    total = steps_for_budget(cfg.tokens, cfg.batch_size, cfg.seq_len, cfg.grad_accum, world)
    warmup = round(cfg.warmup_fraction * total)
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * world
    device = accelerator.device
    fsdp = accelerator.distributed_type.name == "FSDP"

    # Fused AdamW is one kernel for all parameters; FSDP's sharded parameters keep the default.
    optimizer = make_optimizer(model, cfg.lr, cfg.betas, cfg.weight_decay, fused=None if fsdp else True)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    if teacher is not None:
        teacher.to(device)

    if resume is not None:
        _load_checkpoint(accelerator, resume, model, optimizer, sampler)
        start, before, earlier_s, loss = resume["step"], resume["losses_before"], resume["train_s"], resume["loss"]
    else:
        torch.manual_seed(seed + rank)  # a different dropout stream on each rank, the same every run
        start, before, earlier_s, loss = 0, _eval_losses(model, eval_rows), 0.0, None
        _log(live, 0, {f"eval/loss/{d}": v for d, v in before.items()})
        if update_every and live is not None:
            mixture.log_mixture(live, sampler, before, 0)

    bar = tqdm(total=total, initial=start, desc=f"retrain {cfg.method}", unit="step",
               disable=not accelerator.is_main_process)
    t_start, after = time.perf_counter(), None
    for step in range(start, total):
        t0 = time.perf_counter()
        lr = lr_at(step, total, warmup, cfg.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sums: dict[str, torch.Tensor] = {}
        for micro in range(cfg.grad_accum):
            ids, _ = sampler.next_batch(cfg.batch_size * world)
            ids = to_device(ids[rank * cfg.batch_size:(rank + 1) * cfg.batch_size], device)
            last = micro == cfg.grad_accum - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(model):
                logits = model(input_ids=ids, use_cache=False).logits
                teacher_logits = None
                if teacher is not None:
                    with torch.no_grad():
                        teacher_logits = teacher(input_ids=ids, use_cache=False).logits
                micro_loss, parts = retrain_loss(logits, ids, teacher_logits, cfg.distill, cfg.distill_temperature)
                accelerator.backward(micro_loss / cfg.grad_accum)
            for name, value in {"loss": micro_loss.detach(), **parts}.items():
                sums[name] = sums.get(name, 0) + value / cfg.grad_accum
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1

        # One host sync per step, for the progress bar and the logs: the loss averaged over ranks.
        reduced = accelerator.reduce(torch.stack(list(sums.values())), reduction="mean").tolist()
        metrics = {f"train/{k}": v for k, v in zip(sums, reduced)}
        loss = metrics["train/loss"]
        seconds = time.perf_counter() - t0
        metrics.update({"train/lr": lr, "train/tokens_per_s": tokens_per_step / seconds})
        if grad_norm is not None:
            metrics["train/grad_norm"] = float(grad_norm)
        _log(live, done, metrics)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_step / seconds:,.0f}")

        losses = None
        if update_every and done % update_every == 0:
            losses = _eval_losses(model, eval_rows)
            sampler.update({d: v for d, v in losses.items() if d != "mean"})
            if live is not None:
                mixture.log_mixture(live, sampler, losses, done)
        if done % cfg.eval_every == 0 or done == total:
            after = losses or _eval_losses(model, eval_rows)  # the same model: reuse the mixture's measurement
            _log(live, done, {f"eval/loss/{d}": v for d, v in after.items()})
        if checkpoint_dir is not None and (done % cfg.checkpoint_every == 0 or done == total):
            meta = {"step": done, "total_steps": total, "tokens": done * tokens_per_step, "run_hash": run_id}
            extra = {"losses_before": before, "loss": loss, "train_s": earlier_s + time.perf_counter() - t_start}
            _save_checkpoint(accelerator, checkpoint_dir, model, optimizer, sampler, meta, extra)
        if live is not None:
            live.make_summary()
    bar.close()

    train_s = earlier_s + time.perf_counter() - t_start  # over every session of a resumed run
    if after is None:  # resumed from the final checkpoint: nothing left to train
        after = _eval_losses(model, eval_rows)
    summary = {
        "method": cfg.method,
        "steps": total,
        "tokens": total * tokens_per_step,
        "tokens_per_step": tokens_per_step,
        "world_size": world,
        "resumed_from_step": start if resume is not None else None,
        "final_train_loss": loss,
        "loss_before": before,
        "loss_after": after,
        "train_s": round(train_s, 1),  # the loop's wall time, evaluations and checkpoints included
        "tokens_per_s": round(total * tokens_per_step / train_s, 1),
        "mixture_weights": dict(sampler.weights),
        "run_hash": run_id,
    }
    trained = _final_model(accelerator, model, lora)
    accelerator.free_memory()
    return trained, summary
