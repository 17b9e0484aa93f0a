"""The retraining loss: next-token cross-entropy, optionally mixed with distillation from the
unpruned model (the teacher) on the logits and on the hidden states.

    loss = (1 - w) * CE(student, next token) + w * T^2 * KL(teacher_T || student_T) + w_h * L_hidden

where `_T` means softmax(logits / T) over the whole vocabulary (Hinton et al. 2015; the T^2
keeps the gradient scale independent of T). Minitron (Muralidharan et al. 2024) retrains
pruned models by distilling the model before pruning: w = 1 is its pure logit KD (the CE is
then only logged). L_hidden is its intermediate-state loss: each block of the pruned model
is matched to the teacher block it was cut from (the same original index, read from the
pruned model's shear.json, `block_map`), averaged over blocks and positions, with

    cosine: 1 - cos(h_s, h_t)                (NVIDIA ModelOpt's HiddenStateCosineLoss, the
                                              Minitron recipe's intermediate loss)
    nmse:   ||h_s - h_t||^2 / ||h_t||^2      (MSE normalised by the teacher state's size)

per position, where h is a block's output (the residual stream after the block). When
pruning narrowed the hidden size, the student's states first go through one learned linear
map to the teacher's width (shared by all blocks; Minitron's learnable transform), started as
the channel selection that pruning made, so it begins as the identity on the kept channels.
CE and KL are means over the predicted positions (every position but the last).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from shear.errors import ShearError

HIDDEN_LOSSES = ("cosine", "nmse")


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting ids[:, 1:] from logits[:, :-1] (computed in float32)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(teacher || student) at temperature T, summed over the vocabulary, mean over positions."""
    t = temperature
    student = F.log_softmax(student_logits[:, :-1].float() / t, dim=-1).flatten(0, 1)
    teacher = F.log_softmax(teacher_logits[:, :-1].float() / t, dim=-1).flatten(0, 1)
    # kl_div(input=log q, target=log p, log_target=True) = sum p * (log p - log q): KL(p || q).
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * t * t


def hidden_state_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], kind: str = "cosine") -> torch.Tensor:
    """Mean over blocks and positions of the `kind` distance between paired [B, T, H] hidden states."""
    if kind not in HIDDEN_LOSSES or len(student) != len(teacher) or not student:
        raise ValueError(f"hidden_state_loss: kind {kind!r} (valid: {', '.join(HIDDEN_LOSSES)}) of "
                         f"{len(student)} student and {len(teacher)} teacher states")
    per_block = []
    for s, t in zip(student, teacher):
        s, t = s.float(), t.float()
        if kind == "cosine":
            distance = 1 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)
        else:
            distance = (s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-12)
        per_block.append(distance.mean())
    return torch.stack(per_block).mean()


def retrain_loss(logits: torch.Tensor, ids: torch.Tensor, teacher_logits: Optional[torch.Tensor] = None,
                 weight: float = 0.0, temperature: float = 1.0, hidden: Optional[torch.Tensor] = None,
                 hidden_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss and its detached parts {"ce", "kl", "hidden"} ("kl" and "hidden" when used).

    hidden: `hidden_state_loss` of this batch, added with `hidden_weight`.
    """
    pure_kd = teacher_logits is not None and weight == 1
    with torch.no_grad() if pure_kd else contextlib.nullcontext():  # pure KD only logs the CE: no graph for it
        ce = next_token_loss(logits, ids)
    loss, parts = ce, {"ce": ce.detach()}
    if teacher_logits is not None and weight > 0:
        kl = distill_kl(logits, teacher_logits, temperature)
        loss = kl if weight == 1 else (1 - weight) * ce + weight * kl  # w = 1: CE is only logged, not trained on
        parts["kl"] = kl.detach()
    if hidden is not None and hidden_weight > 0:
        loss = loss + hidden_weight * hidden
        parts["hidden"] = hidden.detach()
    return loss, parts


@dataclass(frozen=True)
class BlockMap:
    """Where the pruned model's blocks and hidden channels are in the teacher it was cut from."""

    blocks: list[int]               # the teacher block of each student block, ascending
    channels: Optional[list[int]]   # the teacher channel of each student hidden channel, when narrowed and recorded


def block_map(record: dict, teacher_config, student_config, where: str) -> BlockMap:
    """The `BlockMap` of a pruned model from its shear.json `record` (read from `where`).

    Depth pruning records `removed_blocks`; width and sheared pruning record `kept.layers` and
    `kept.hidden`; a model with as many blocks as the teacher and no record maps one to one.
    """
    n_teacher, n_student = teacher_config.num_hidden_layers, student_config.num_hidden_layers
    kept = record.get("kept") if isinstance(record.get("kept"), dict) else {}
    if kept.get("layers") is not None:
        blocks = sorted(int(i) for i in kept["layers"])
    elif record.get("removed_blocks") is not None:
        removed = {int(i) for i in record["removed_blocks"]}
        blocks = [i for i in range(n_teacher) if i not in removed]
    else:
        blocks = list(range(n_teacher))
    if len(blocks) != n_student or len(set(blocks)) != len(blocks) or any(not 0 <= i < n_teacher for i in blocks):
        raise ShearError(f"{where}: the recorded blocks {blocks} do not map the pruned model's {n_student} blocks "
                         f"into the teacher's {n_teacher}; retrain.distill_hidden needs the base model the pruned "
                         "one was cut from (re-run the prune stage)")
    d_teacher, d_student = teacher_config.hidden_size, student_config.hidden_size
    channels = kept.get("hidden") if d_student != d_teacher else None
    if channels is not None and (len(channels) != d_student or any(not 0 <= c < d_teacher for c in channels)):
        raise ShearError(f"{where}: kept.hidden lists {len(channels)} channels of the teacher's {d_teacher}, but the "
                         f"pruned model has hidden_size {d_student} (re-run the prune stage)")
    return BlockMap(blocks, [int(c) for c in channels] if channels is not None else None)


def projection(mapping: BlockMap, d_student: int, d_teacher: int) -> Optional[torch.nn.Linear]:
    """The learned map of student hidden states to the teacher's width, None when the widths are equal.

    Starts as the channel selection pruning made when it is recorded (student channel k to
    teacher channel channels[k]), else as nn.Linear's random start.
    """
    if d_student == d_teacher:
        return None
    linear = torch.nn.Linear(d_student, d_teacher, bias=False)
    if mapping.channels is not None:
        with torch.no_grad():
            linear.weight.zero_()
            linear.weight[mapping.channels, torch.arange(d_student)] = 1.0
    return linear
