"""Sheared-LLaMA targeted structured pruning (Xia et al., 2023) on a standard LlamaForCausalLM.

1. Hard-concrete masks (`shear.prune.l0`) over layers, heads, MLP neurons and hidden
   channels are applied inside the forward pass through hooks (`MaskHooks`); the model
   code is transformers' own.
2. The masks' log-alpha are learned jointly with the LM loss (and, unless lr_model is 0,
   the weights) under a Lagrangian that pushes each mask type's expected sparsity to
   the target's; the multipliers are trained by gradient ascent (`train_masks`).
3. The masks become exact: each type keeps the target count of its highest-scoring
   units; the surviving mask values are folded into the weights and the model is cut to
   the target shape (`finalize`), giving a standard checkpoint.

The optimiser follows the reference run (princeton-nlp/LLM-Shearing, scripts/pruning.sh):
AdamW with betas (0.9, 0.95), no weight decay, gradient clipping at 1.0, one learning-rate
schedule for all groups (linear warm-up over the first 10% of steps, then cosine down to
10%), and the mask and multiplier groups at lr 1.0.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from shear.errors import ShearError
from shear.io import atomic_file, trim_logs
from shear.models import residual_writers
from shear.prune.l0 import L0Masks, fold_masks

BETAS = (0.9, 0.95)
GRAD_CLIP = 1.0
LR_WARMUP_FRACTION = 0.1
LR_FINAL_FACTOR = 0.1
CHECKPOINT_FILE = "state.pt"


# ----------------------------------------------------------------------------- masked forward


class MaskHooks:
    """Apply mask values to a LlamaForCausalLM's forward pass through module hooks.

    Where each mask acts:
      head       o_proj input, per head (times the KV-group mask under GQA)
      mlp        down_proj input, per neuron
      layer      o_proj and down_proj outputs (the block's two residual contributions);
                 in Gemma 3 the outputs of the post norms that follow them, while the
                 hidden mask stays on o_proj / down_proj (before the norm)
      hidden     embedding output, o_proj and down_proj outputs (so pruned channels stay
                 exactly zero in the residual stream) and the final norm output (so the
                 LM head, tied or not, sees the channels the pruned model will keep)
    The reference model also scales the two norms inside each block by the hidden mask;
    here their input is already masked through the residual stream, so a kept channel
    enters attention and MLP scaled by z rather than z^2 (the same for 0/1 masks).
    `set(None)` makes every hook a pass-through.
    """

    def __init__(self, model, masks: L0Masks):
        self.masks = masks
        self.head_dim = masks.source["head_dim"]
        self.factors: Optional[dict[str, torch.Tensor]] = None
        core = model.model
        self.handles = [
            core.embed_tokens.register_forward_hook(self._scale_output("hidden")),
            core.norm.register_forward_hook(self._scale_output("hidden")),
        ]
        for i, layer in enumerate(core.layers):
            for (proj, out), inputs in zip(residual_writers(layer), ("heads", "mlp")):
                self.handles.append(proj.register_forward_pre_hook(self._scale_input(inputs, i)))
                if proj is out:
                    self.handles.append(proj.register_forward_hook(self._scale_output("residual", i)))
                else:  # Gemma 3: hidden mask before the post norm (zeroes stay zero), layer mask after
                    self.handles.append(proj.register_forward_hook(self._scale_output("hidden")))
                    self.handles.append(out.register_forward_hook(self._scale_output("layer", i)))

    def set(self, z: Optional[dict[str, torch.Tensor]]) -> None:
        """Use mask values `z` (a dict per mask type) in the next forward passes; None = no masks."""
        if z is None:
            self.factors = None
            return
        heads = self.masks.effective_heads(z).repeat_interleave(self.head_dim, dim=-1)  # [L, H * hd]
        self.factors = {
            "hidden": z["hidden"],
            "heads": heads,
            "mlp": z["mlp"],
            "residual": z["layer"].unsqueeze(-1) * z["hidden"],                         # [L, d]
            "layer": z["layer"].unsqueeze(-1),                                          # [L, 1]
        }

    def _factor(self, name: str, layer: Optional[int], like: torch.Tensor) -> torch.Tensor:
        f = self.factors[name] if layer is None else self.factors[name][layer]
        return f.to(like.dtype)

    def _scale_input(self, name: str, layer: Optional[int] = None):
        def hook(module, args):
            if self.factors is None:
                return None
            return (args[0] * self._factor(name, layer, args[0]),) + tuple(args[1:])
        return hook

    def _scale_output(self, name: str, layer: Optional[int] = None):
        def hook(module, args, output):
            if self.factors is None:
                return None
            return output * self._factor(name, layer, output)
        return hook

    def remove(self) -> None:
        """Detach every hook: the model is plain again."""
        for h in self.handles:
            h.remove()
        self.handles = []


# ----------------------------------------------------------------------------- one step


def lr_factor(step: int, total: int) -> float:
    """Reference schedule: linear warm-up over 10% of the steps, then cosine down to 10%."""
    warmup = max(1, round(LR_WARMUP_FRACTION * total))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return LR_FINAL_FACTOR + (1 - LR_FINAL_FACTOR) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model, masks: L0Masks, lr_model: float, lr_mask: float, lr_lambda: float):
    """AdamW with three groups: weights (descent), log-alphas (descent), multipliers (ascent)."""
    groups = [
        {"params": list(masks.masks.parameters()), "lr": lr_mask},
        {"params": list(masks.lambdas.parameters()), "lr": lr_lambda, "maximize": True},
    ]
    if lr_model > 0:
        groups.insert(0, {"params": [p for p in model.parameters() if p.requires_grad], "lr": lr_model})
    return torch.optim.AdamW(groups, betas=BETAS, eps=1e-8, weight_decay=0.0)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; full precision on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(model, masks: L0Masks, hooks: MaskHooks, optimizer, batch: torch.Tensor,
               progress: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One pruning step: sample masks, LM loss + Lagrangian, backward, clip, optimizer step.

    Returns the step's LM loss and Lagrangian term as detached tensors (the caller decides
    when to synchronise with the device).
    """
    masks.constrain()
    hooks.set(masks.sample(generator))
    with autocast(batch.device):
        lm_loss = model(input_ids=batch, labels=batch).loss
    lagrangian = masks.lagrangian(progress)
    (lm_loss + lagrangian).backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"lm_loss": lm_loss.detach(), "lagrangian": lagrangian.detach()}


# ----------------------------------------------------------------------------- training run


def _save_checkpoint(path: Path, state: dict) -> None:
    with atomic_file(path, "wb") as f:
        torch.save(state, f)


def _log_step(live, masks: L0Masks, source_params: float, step: int, metrics: dict, targets: dict, lr: float):
    """Write one step's pruning metrics to DVCLive."""
    live.step = step
    live.log_metric("train/lm_loss", metrics["lm_loss"])
    live.log_metric("train/lagrangian", metrics["lagrangian"])
    live.log_metric("train/lr_factor", lr)
    with torch.no_grad():
        scores = masks.expected_scores()
        expected = masks.parameters_kept(scores).item()
        for name, s in scores.items():
            live.log_metric(f"expected_size/{name}", s.sum(-1).mean().item())
            live.log_metric(f"expected_sparsity/{name}", 1 - s.mean().item())
            live.log_metric(f"target_sparsity/{name}", targets[name])
        for name, lam in masks.lambdas.items():
            live.log_metric(f"lambda/{name}", lam.item())
    live.log_metric("expected_size/non_embedding_params", expected)
    live.log_metric("expected_size/fraction_of_base", expected / source_params)
    live.next_step()


def train_masks(model, masks: L0Masks, sampler, *, steps: int, batch_size: int, lr_model: float,
                lr_mask: float, lr_lambda: float, warmup_fraction: float, checkpoint_every: int,
                checkpoint_dir: str | Path, log_dir: str | Path, fingerprint: str, seed: int = 0,
                heldout: Optional[dict[str, torch.Tensor]] = None, update_every: int = 10) -> dict:
    """Learn the masks (and the weights unless lr_model is 0) for `steps` optimizer steps.

    `model` and `masks` must be on the training device. Batches come from `sampler`; when
    `heldout` is given the sampler is dynamic and is updated every `update_every` steps from
    the held-out losses of the model as it currently stands (deterministic masks at their
    expected sizes). A checkpoint (weights if trained, masks, multipliers, optimizer,
    scheduler, sampler, RNG, step) is written to `checkpoint_dir` every `checkpoint_every`
    steps and at the end; a later call with the same `fingerprint` resumes from it and
    reaches the same result. Returns the last step's metrics.
    """
    from dvclive import Live

    from shear.mixture import domain_losses, log_mixture

    device = next(masks.parameters()).device
    checkpoint = Path(checkpoint_dir) / CHECKPOINT_FILE
    log_dir = Path(log_dir)
    if lr_model <= 0:
        model.requires_grad_(False)
    model.train()
    hooks = MaskHooks(model, masks)
    optimizer = make_optimizer(model, masks, lr_model, lr_mask, lr_lambda)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps))
    generator = torch.Generator().manual_seed(seed)
    warmup_steps = round(warmup_fraction * steps)
    source_params = masks.parameters_kept({n: torch.ones_like(m.log_alpha) for n, m in masks.masks.items()}).item()

    start, last = 0, {}
    # Loaded on the CPU: RNG states must stay CPU tensors; load_state_dict moves the rest.
    state = torch.load(checkpoint, map_location="cpu", weights_only=False) if checkpoint.is_file() else None
    if state is not None and state["fingerprint"] == fingerprint:
        if state.get("model") is not None:
            model.load_state_dict(state["model"])
        masks.load_state_dict(state["masks"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        generator.set_state(state["rng"]["masks"])
        torch.set_rng_state(state["rng"]["torch"])
        start, last = state["step"], state["last"]
        trim_logs(log_dir, start)
        print(f"sheared: resuming from {checkpoint} at step {start}/{steps}")
    elif state is not None:
        print(f"sheared: {checkpoint} belongs to another run (params changed); starting afresh")
    live = Live(str(log_dir), resume=start > 0, dvcyaml=False, save_dvc_exp=False, report=None)

    def save(step: int) -> None:
        _save_checkpoint(checkpoint, {
            "fingerprint": fingerprint, "step": step, "last": last,
            "model": model.state_dict() if lr_model > 0 else None,
            "masks": masks.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "sampler": sampler.state_dict(),
            "rng": {"masks": generator.get_state(), "torch": torch.get_rng_state()},
        })

    bar = tqdm(range(start, steps), desc="sheared pruning", unit="step", initial=start, total=steps)
    try:
        for step in bar:
            batch, _ = sampler.next_batch(batch_size)
            progress = min(1.0, step / warmup_steps) if warmup_steps else 1.0
            out = train_step(model, masks, hooks, optimizer, batch.to(device), progress, generator)
            scheduler.step()
            done = step + 1
            last = {k: float(v) for k, v in out.items()}
            if heldout is not None and done % update_every == 0:
                hooks.set(masks.deterministic(exact=False))
                losses = domain_losses(model, heldout)
                sampler.update(losses)
                log_mixture(live, sampler, losses, done)
            _log_step(live, masks, source_params, done, last, masks.target_sparsity(progress),
                      lr_factor(step, steps))
            bar.set_postfix(lm_loss=f"{last['lm_loss']:.3f}", lag=f"{last['lagrangian']:.3f}")
            if done % checkpoint_every == 0 or done == steps:
                save(done)
    finally:
        hooks.remove()
        live.end()
    return last


# ----------------------------------------------------------------------------- finalisation


def finalize(model, masks: L0Masks):
    """Exact masks -> folded weights -> a model cut to the target shape.

    Returns (pruned model, kept units in `slice_model`'s format, the exact mask values).
    The model is modified in place (and then sliced).
    """
    from shear.prune.width import slice_model

    masks.constrain()
    z = masks.deterministic(exact=True)
    keep = masks.kept_units(z)
    fold_masks(model, masks, z)
    model = slice_model(model, keep)
    got = {k: getattr(model.config, k) for k in masks.target}
    if got != masks.target:
        raise ShearError(f"sheared pruning produced shape {got}, not the target {masks.target} (a bug)")
    return model, keep, z


def prune_sheared(model, target: dict, sampler, *, tokens: int, batch_size: int, lr_model: float,
                  lr_mask: float, lr_lambda: float, warmup_fraction: float, temperature: float,
                  checkpoint_every: int, checkpoint_dir: str | Path, log_dir: str | Path, fingerprint: str,
                  device: torch.device, seed: int = 0, heldout: Optional[dict[str, torch.Tensor]] = None,
                  update_every: int = 10):
    """The whole method: masks from the source and target shapes, training, finalisation.

    Returns (pruned model on the CPU, record for shear.json).
    """
    from shear.models import architecture, layout

    source = architecture(model.config)
    masks = L0Masks(source, target, temperature=temperature, seed=seed, layout=layout(model.config))
    steps = max(1, math.ceil(tokens / (batch_size * sampler.seq_len)))
    model.to(device)
    masks.to(device)
    last = train_masks(model, masks, sampler, steps=steps, batch_size=batch_size, lr_model=lr_model,
                       lr_mask=lr_mask, lr_lambda=lr_lambda, warmup_fraction=warmup_fraction,
                       checkpoint_every=checkpoint_every, checkpoint_dir=checkpoint_dir, log_dir=log_dir,
                       fingerprint=fingerprint, seed=seed, heldout=heldout, update_every=update_every)
    with torch.no_grad():
        scores = masks.expected_scores()
        expected = {name: s.sum(-1).mean().item() for name, s in scores.items()}
        expected["non_embedding_params"] = masks.parameters_kept(scores).item()
    model, keep, _ = finalize(model.cpu(), masks.cpu())
    record = {
        "method": "sheared",
        "target": dict(masks.target),
        "kept": keep,
        "lambdas": {name: lam.item() for name, lam in masks.lambdas.items()},
        "expected_sizes": expected,
        "mixture": {"final_weights": dict(sampler.weights), "history": getattr(sampler, "history", [])},
        "training": {"steps": steps, "tokens": steps * batch_size * sampler.seq_len, "batch_size": batch_size,
                     "seq_len": sampler.seq_len, "lr_model": lr_model, "lr_mask": lr_mask, "lr_lambda": lr_lambda,
                     "warmup_fraction": warmup_fraction, "temperature": temperature, "final": last},
    }
    return model, record
