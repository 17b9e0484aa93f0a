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
schedule for all groups (shear.trainer.lr_factor: linear warm-up over `lr_warmup_fraction`
of the steps, 0.1 in the reference, then cosine down to 10%), and the mask and multiplier
groups at lr 1.0. The loop, checkpoints and multi-process launch are the shared training-run
scaffold's (shear/trainer.py): `accelerate` processes, each rank its slice of one global batch,
micro-batches with gradient accumulation; the model is copied to every process (DDP) or
sharded over them (FSDP2, accelerate's plugin: each decoder block its own unit, bf16 compute
with float32 master weights and gradient reduction on CUDA).

Under either, the masks and multipliers stay outside the model: plain tensors, the whole of
them on every rank, with an AdamW of their own (`ShearedObjective`). Their gradients are
averaged over the ranks by one all-reduce per step, so identical gradients and identical
optimizers keep them identical everywhere (checked before the cut). The hooks that apply
them sit on the model's own submodules (o_proj, down_proj, embeddings, final norm), which
FSDP2 shards in place without replacing, so they act inside the sharded forward unchanged.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import torch

from shear import trainer
from shear.errors import ShearError
from shear.models import residual_writers
from shear.prune.l0 import L0Masks, fold_masks

BETAS = (0.9, 0.95)
GRAD_CLIP = 1.0


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


# ----------------------------------------------------------------------------- training


def make_weights_optimizer(model, lr_model: float):
    """AdamW over the model's weights (descent). Frozen weights (lr_model 0) get no AdamW state:
    it keeps moments only for parameters that receive gradients."""
    return trainer.make_optimizer([{"params": list(model.parameters()), "lr": lr_model, "weight_decay": 0.0}],
                                  BETAS)


def make_mask_optimizer(masks: L0Masks, lr_mask: float, lr_lambda: float):
    """AdamW with two groups: log-alphas (descent), Lagrange multipliers (ascent)."""
    return trainer.make_optimizer([
        {"params": list(masks.masks.parameters()), "lr": lr_mask, "weight_decay": 0.0},
        {"params": list(masks.lambdas.parameters()), "lr": lr_lambda, "weight_decay": 0.0, "maximize": True},
    ], BETAS)


class ShearedObjective(trainer.Objective):
    """LM loss under sampled hard-concrete masks plus the Lagrangian, for the shared training loop.

    One mask draw per optimizer step, shared by every micro-batch and every rank: the draw
    comes from one generator seeded alike everywhere, re-drawn from the same generator state
    for each micro-batch (so each micro-batch's graph is its own). The masks and multipliers
    live outside the (DDP- or FSDP-wrapped) model with their own optimizer, so their gradients
    are averaged across ranks here; with identical gradients and optimizers they stay
    identical on every rank.
    """

    def __init__(self, masks: L0Masks, hooks: MaskHooks, accelerator, lagrangian_warmup_steps: int,
                 source_params: float, seed: int, lr_mask: float = 1.0, lr_lambda: float = 1.0):
        self.masks, self.hooks, self.accelerator = masks, hooks, accelerator
        self.optimizer = make_mask_optimizer(masks, lr_mask, lr_lambda)
        self.warmup = lagrangian_warmup_steps
        self.source_params = source_params
        self.generator = torch.Generator().manual_seed(seed)
        self.progress, self.draw_state = 1.0, None

    def extra_parameters(self):
        return list(self.masks.parameters())

    def extra_optimizer(self):
        return self.optimizer

    def lagrangian_progress(self, step: int) -> float:
        """Fraction of the target sparsity that step `step` (0-based) aims at: a linear ramp."""
        return min(1.0, step / self.warmup) if self.warmup else 1.0

    def begin_step(self, step):
        self.masks.constrain()
        self.progress = self.lagrangian_progress(step)
        self.draw_state = self.generator.get_state()

    def loss(self, model, ids, step):
        self.generator.set_state(self.draw_state)
        self.hooks.set(self.masks.sample(self.generator))
        lm_loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        lagrangian = self.masks.lagrangian(self.progress)
        return lm_loss + lagrangian, {"lm_loss": lm_loss.detach(), "lagrangian": lagrangian.detach()}

    def before_update(self):
        if self.accelerator.num_processes > 1:
            for p in self.masks.parameters():
                if p.grad is not None:
                    p.grad = self.accelerator.reduce(p.grad, reduction="mean")

    def step_metrics(self, step):
        metrics = {}
        targets = self.masks.target_sparsity(self.progress)
        with torch.no_grad():
            scores = self.masks.expected_scores()
            expected = self.masks.parameters_kept(scores).item()
            for name, s in scores.items():
                metrics[f"expected_size/{name}"] = s.sum(-1).mean().item()
                metrics[f"expected_sparsity/{name}"] = 1 - s.mean().item()
                metrics[f"target_sparsity/{name}"] = targets[name]
            for name, lam in self.masks.lambdas.items():
                metrics[f"lambda/{name}"] = lam.item()
        metrics["expected_size/non_embedding_params"] = expected
        metrics["expected_size/fraction_of_base"] = expected / self.source_params
        return metrics

    @contextlib.contextmanager
    def evaluation(self):
        # The model as it currently stands: deterministic masks at their expected sizes.
        self.hooks.set(self.masks.deterministic(exact=False))
        yield

    def state(self):
        return {"masks": self.masks.state_dict(), "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state()}

    def load_state(self, state):
        self.masks.load_state_dict(state["masks"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])


def check_identical_on_ranks(accelerator, masks: L0Masks) -> None:
    """Refuse to finalise if any rank's masks or multipliers differ from rank 0's (a bug)."""
    if accelerator.num_processes == 1:
        return
    flat = torch.cat([p.detach().flatten() for p in masks.parameters()]).unsqueeze(0)
    every = accelerator.gather(flat)
    if not torch.equal(every, every[:1].expand_as(every)):
        raise ShearError("sheared pruning: the masks differ across processes (a bug); report it with your params")


def train_masks(model, masks: L0Masks, sampler, plan: trainer.RunPlan, accelerator, *, lr_model: float,
                lr_mask: float, lr_lambda: float, lagrangian_warmup_fraction: float, checkpoint_every: int,
                checkpoint_dir: str | Path, fingerprint: str, live=None, resume: Optional[dict] = None,
                seed: int = 0, heldout: Optional[dict[str, torch.Tensor]] = None, update_every: int = 10,
                activation_checkpointing: bool = False) -> trainer.RunResult:
    """Learn the masks (and the weights unless lr_model is 0) for `plan.total_steps` optimizer steps.

    Runs the shared loop of shear/trainer.py on `accelerator`'s processes (the model is
    DDP-wrapped when its weights train, FSDP-sharded whenever `accelerator` is FSDP's). When
    `heldout` is given the sampler is dynamic and
    is updated every `update_every` steps from the held-out losses of the model as it
    currently stands (deterministic masks at their expected sizes). A checkpoint (trained
    weights, masks, multipliers, optimizer, sampler, RNG, step) is written to
    `checkpoint_dir` every `checkpoint_every` steps and at the end; `resume` (a state from
    `shear.trainer.read_checkpoint` with the same `fingerprint`) continues it to the same
    result. `masks` and `model` are left on the accelerator's device.
    """
    if lr_model <= 0:
        model.requires_grad_(False)
    if activation_checkpointing:
        trainer.set_activation_checkpointing(model, True)
    masks.to(accelerator.device)
    hooks = MaskHooks(model, masks)  # on the plain model's modules, before any wrapping
    if lr_model > 0 or trainer.is_fsdp(accelerator):
        # accelerate shards a model under FSDP only together with its optimizer, frozen or not
        model, optimizer = accelerator.prepare(model, make_weights_optimizer(model, lr_model))
    else:  # nothing of the model trains: DDP has nothing to synchronise
        model, optimizer = model.to(accelerator.device), None
    source_params = masks.parameters_kept({n: torch.ones_like(m.log_alpha) for n, m in masks.masks.items()}).item()
    objective = ShearedObjective(masks, hooks, accelerator, round(lagrangian_warmup_fraction * plan.total_steps),
                                 source_params, seed, lr_mask, lr_lambda)
    try:
        result = trainer.fit(model, optimizer, objective, sampler, plan, accelerator, desc="sheared pruning",
                             grad_clip=GRAD_CLIP, eval_rows=heldout, update_every=update_every if heldout else None,
                             live=live, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                             fingerprint=fingerprint, resume=resume, seed=seed)
    finally:
        hooks.remove()
        if activation_checkpointing:
            trainer.set_activation_checkpointing(accelerator.unwrap_model(model), False)
    masks.constrain()
    check_identical_on_ranks(accelerator, masks)
    return result


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


def prune_sheared(model, masks: L0Masks, sampler, plan: trainer.RunPlan, accelerator, *, lr_model: float,
                  lr_mask: float, lr_lambda: float, lagrangian_warmup_fraction: float, checkpoint_every: int,
                  checkpoint_dir: str | Path, fingerprint: str, live=None, resume: Optional[dict] = None,
                  seed: int = 0, heldout: Optional[dict[str, torch.Tensor]] = None, update_every: int = 10,
                  activation_checkpointing: bool = False):
    """The whole method: training the masks (`train_masks`), then finalisation on rank 0.

    Returns (pruned model on the CPU, record for shear.json) on rank 0, (None, record) elsewhere.
    """
    result = train_masks(model, masks, sampler, plan, accelerator, lr_model=lr_model, lr_mask=lr_mask,
                         lr_lambda=lr_lambda, lagrangian_warmup_fraction=lagrangian_warmup_fraction,
                         checkpoint_every=checkpoint_every, checkpoint_dir=checkpoint_dir, fingerprint=fingerprint,
                         live=live, resume=resume, seed=seed, heldout=heldout, update_every=update_every,
                         activation_checkpointing=activation_checkpointing)
    with torch.no_grad():
        scores = masks.expected_scores()
        expected = {name: s.sum(-1).mean().item() for name, s in scores.items()}
        expected["non_embedding_params"] = masks.parameters_kept(scores).item()
    record = {
        "method": "sheared",
        "target": dict(masks.target),
        "lambdas": {name: lam.item() for name, lam in masks.lambdas.items()},
        "expected_sizes": expected,
        "mixture": {"final_weights": dict(sampler.weights), "history": getattr(sampler, "history", [])},
        "training": {"steps": plan.total_steps, "tokens": plan.total_steps * plan.tokens_per_step,
                     "tokens_per_step": plan.tokens_per_step, "batch_size": plan.batch_size,
                     "grad_accum": plan.grad_accum, "world_size": plan.world_size, "seq_len": plan.seq_len,
                     "lr_model": lr_model, "lr_mask": lr_mask, "lr_lambda": lr_lambda,
                     "lr_warmup_steps": plan.warmup_steps, "lagrangian_warmup_fraction": lagrangian_warmup_fraction,
                     "temperature": masks.masks["layer"].temperature,
                     "resumed_from_step": result.resumed_from_step, "train_s": round(result.train_s, 1),
                     "final": result.last},
    }
    record["training"]["sharding"] = "fsdp" if trainer.is_fsdp(accelerator) else \
        "ddp" if accelerator.num_processes > 1 else "none"
    model = trainer.gather_model(accelerator, model)  # FSDP: every rank sends its shards to rank 0
    if model is None:
        return None, record
    model, keep, _ = finalize(model, masks.cpu())
    record["kept"] = keep
    return model, record
