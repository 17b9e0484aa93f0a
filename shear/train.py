"""Retraining a pruned model: LoRA or full-parameter continued pre-training (CPT), optional
distillation from the unpruned model, a budget in tokens, checkpoints that resume exactly.

Shortened LLaMA (Kim et al. 2024): LoRA is enough at mild pruning, CPT wins at severe
pruning. Minitron (Muralidharan et al. 2024): distilling the logits of the model before
pruning beats plain next-token loss (the loss is in shear/distill.py).

Each method trains with its paper's optimizer recipe (retrain.lora / retrain.cpt in
params.yaml: weight decay, AdamW betas, the learning-rate decay). Distillation can add the
teacher's hidden states: every block of the pruned model learns to output what the teacher
block it was cut from outputs (`BlockMap` in shear/distill.py).

The loop, the schedule (linear warm-up, then cosine or linear decay), the optimizer groups,
the checkpoints and the launch are the shared training-run scaffold's (shear/trainer.py);
this module adds the retraining objective (CE, optionally distilled), LoRA and the final
merge. Distribution is `accelerate`'s (DDP, FSDP, gloo on CPU; see stages/retrain.py).
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from shear.distill import BlockMap, hidden_state_loss, projection, retrain_loss
from shear.errors import ShearError
from shear.trainer import Objective, decay_groups, fit, make_optimizer, plan_run

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
    with warnings.catch_warnings():
        # peft reads transformers' deprecated `is_gradient_checkpointing`; its FutureWarning on stderr
        # would be a second line beside a stage's one error line
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        return get_peft_model(model, config)


def require_teacher(directory: str | Path) -> None:
    """Distillation needs the unpruned base model on disk."""
    if not (Path(directory) / "config.json").is_file():
        raise ShearError(
            f"retrain.distill > 0 (or retrain.distill_hidden > 0) needs the teacher {directory} (the unpruned base "
            "model), which is missing; run the base stage (`dvc repro base`) or set both to 0"
        )


def load_teacher(directory: str | Path, student, device: torch.device, dtype: str = "auto"):
    """The frozen base model used as distillation teacher, on `device`, in `run.dtype` (auto: bf16 on CUDA)."""
    from shear.models import load_model, resolve_dtype

    require_teacher(directory)
    teacher, _, _ = load_model(directory, dtype=resolve_dtype(dtype, device), device=device)
    if teacher.config.vocab_size != student.config.vocab_size:
        raise ShearError(
            f"{directory}: teacher vocabulary ({teacher.config.vocab_size}) differs from the pruned model's "
            f"({student.config.vocab_size}); distillation needs the model the pruned one was cut from"
        )
    return teacher.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- the objective and the run


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
    # float32 before merging: a bf16 frozen base would round the small (alpha / r) B A away
    model = accelerator.unwrap_model(model, keep_fp32_wrapper=False).to("cpu").float()
    if lora:
        model = model.merge_and_unload()  # W + (alpha / r) B A, adapters gone: a plain checkpoint
    return model.eval()


def decoder_layers(model) -> torch.nn.ModuleList:
    """The transformer blocks of a causal LM, plain or LoRA-wrapped."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.layers


@contextlib.contextmanager
def block_outputs(layers, indices: list[int]) -> Iterator[list[torch.Tensor]]:
    """The outputs of layers[i] for i in `indices`, in that order, collected during the `with` body.

    The hooks live only as long as the body, so evaluation passes keep nothing and the list,
    once the caller drops it, holds no activation past the step.
    """
    found: dict[int, torch.Tensor] = {}

    def keeper(position):
        def hook(module, args, output):
            found[position] = output[0] if isinstance(output, tuple) else output
        return hook

    outputs: list[torch.Tensor] = []
    handles = [layers[i].register_forward_hook(keeper(pos)) for pos, i in enumerate(indices)] if indices else []
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()
        outputs.extend(found[pos] for pos in sorted(found))


class Retraining(Objective):
    """Next-token cross-entropy, mixed with distillation from `teacher`: logits when `distill` > 0,
    hidden states when `hidden` > 0 (block j of the student against teacher block `mapping.blocks[j]`)."""

    def __init__(self, teacher=None, distill: float = 0.0, temperature: float = 1.0, *, student=None,
                 hidden: float = 0.0, hidden_loss: str = "cosine", mapping: Optional[BlockMap] = None):
        self.teacher, self.distill, self.temperature = teacher, distill, temperature
        self.hidden, self.hidden_loss = hidden, hidden_loss
        self.teacher_blocks: list[int] = []
        self.student_blocks: list[int] = []
        self.student_layers, self.projection = None, None
        if hidden > 0:
            if teacher is None or student is None or mapping is None:
                raise ValueError("hidden-state distillation needs the teacher, the student and their BlockMap")
            self.teacher_blocks, self.student_blocks = mapping.blocks, list(range(len(mapping.blocks)))
            self.student_layers = decoder_layers(student)
            self.projection = projection(mapping, student.config.hidden_size, teacher.config.hidden_size)

    def extra_parameters(self) -> list[torch.nn.Parameter]:
        """The student-to-teacher width map, when the widths differ."""
        return list(self.projection.parameters()) if self.projection is not None else []

    def loss(self, model, ids, step):
        teacher_logits, teacher_states = None, []
        if self.teacher is not None and (self.distill > 0 or self.hidden > 0):
            with torch.no_grad(), block_outputs(decoder_layers(self.teacher), self.teacher_blocks) as teacher_states:
                if self.distill > 0:
                    teacher_logits = self.teacher(input_ids=ids, use_cache=False).logits
                else:  # the hidden states only: no vocabulary projection
                    self.teacher.model(input_ids=ids, use_cache=False)
        with block_outputs(self.student_layers, self.student_blocks) as student_states:
            logits = model(input_ids=ids, use_cache=False).logits
        hidden_term = None
        if self.hidden > 0:
            if self.projection is not None:
                student_states = [self.projection(h.to(self.projection.weight.dtype)) for h in student_states]
            hidden_term = hidden_state_loss(student_states, teacher_states, self.hidden_loss)
        return retrain_loss(logits, ids, teacher_logits, self.distill, self.temperature, hidden_term, self.hidden)

    def before_update(self) -> None:
        """Average the width map's gradient over ranks: it lives outside the DDP / FSDP model."""
        if self.projection is None or not torch.distributed.is_initialized():
            return
        world = torch.distributed.get_world_size()
        for p in self.projection.parameters():
            if p.grad is not None and world > 1:
                torch.distributed.all_reduce(p.grad)
                p.grad /= world

    def state(self) -> dict:
        """The width map's weights (the optimizer holds its moments)."""
        return {"projection": self.projection.state_dict()} if self.projection is not None else {}

    def load_state(self, state: dict) -> None:
        """Restore `state()`."""
        if self.projection is not None:
            self.projection.load_state_dict(state["projection"])


def train(model, sampler, cfg, accelerator, *, teacher=None, mapping: Optional[BlockMap] = None, eval_rows=None,
          update_every: Optional[int] = None, live=None, checkpoint_dir: Optional[str | Path] = None,
          run_id: str = "", resume: Optional[dict] = None, seed: int = 0) -> tuple[Any, dict]:
    """Retrain `model` (already LoRA-wrapped for method lora) on batches from `sampler`.

    cfg: the `retrain` params section (RetrainParams); the optimizer follows `cfg.recipe`, the
    method's section. teacher: the frozen base model when `cfg.needs_teacher`; mapping: where
    the student's blocks are in it (`shear.distill.block_map`), for `cfg.distill_hidden` > 0.
    eval_rows: held-out rows per domain, evaluated every cfg.eval_every
    steps and used by the dynamic mixture every `update_every` steps (None = fixed mixture).
    live: a DVCLive `Live` on rank 0, None elsewhere. checkpoint_dir / run_id: where and as
    which run to checkpoint every cfg.checkpoint_every steps; resume: a state from
    `shear.trainer.read_checkpoint` to continue from.

    Returns (model, summary): the trained model as a plain CPU module with the LoRA
    adapters merged (None on ranks other than 0) and a summary dict for shear.json.
    """
    plan = plan_run("retrain", cfg.tokens, cfg.batch_size, cfg.seq_len, cfg.grad_accum, accelerator.num_processes,
                    cfg.warmup_fraction)
    fsdp = accelerator.distributed_type.name == "FSDP"
    recipe = cfg.recipe
    objective = Retraining(teacher, cfg.distill, cfg.distill_temperature, student=model, hidden=cfg.distill_hidden,
                           hidden_loss=cfg.distill_hidden_loss, mapping=mapping)
    if objective.projection is not None:
        objective.projection.to(accelerator.device)
    # Fused AdamW is one kernel for all parameters; FSDP's sharded parameters keep the default.
    params = list(model.parameters()) + objective.extra_parameters()
    optimizer = make_optimizer(decay_groups(params, cfg.lr, recipe.weight_decay), recipe.betas,
                               fused=None if fsdp else True)
    model, optimizer = accelerator.prepare(model, optimizer)
    if teacher is not None:
        teacher.to(accelerator.device)
    result = fit(model, optimizer, objective, sampler, plan, accelerator, desc=f"retrain {cfg.method}",
                 grad_clip=cfg.grad_clip, eval_rows=eval_rows, eval_every=cfg.eval_every, update_every=update_every,
                 live=live, checkpoint_dir=checkpoint_dir, checkpoint_every=cfg.checkpoint_every, fingerprint=run_id,
                 resume=resume, seed=seed, lr_schedule=recipe.schedule)
    summary = {
        "method": cfg.method,
        "steps": plan.total_steps,
        "tokens": plan.total_steps * plan.tokens_per_step,
        "tokens_per_step": plan.tokens_per_step,
        "world_size": plan.world_size,
        "resumed_from_step": result.resumed_from_step,
        "final_train_loss": result.last.get("loss"),
        "loss_before": result.losses_before,
        "loss_after": result.losses_after,
        "train_s": round(result.train_s, 1),  # the loop's wall time, evaluations and checkpoints included
        "tokens_per_s": round(plan.total_steps * plan.tokens_per_step / result.train_s, 1),
        "mixture_weights": dict(sampler.weights),
        "run_hash": run_id,
    }
    trained = _final_model(accelerator, model, cfg.method == "lora")
    accelerator.free_memory()
    return trained, summary
