"""The retraining loss: next-token cross-entropy, optionally mixed with logit distillation.

    loss = (1 - w) * CE(student, next token) + w * T^2 * KL(teacher_T || student_T)

where `_T` means softmax(logits / T) over the whole vocabulary (Hinton et al. 2015; the T^2
keeps the gradient scale independent of T) and the teacher is the unpruned base model
(Minitron: distilling from the model before pruning recovers more than plain CE).
Both terms are means over the predicted positions (every position but the last).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


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


def retrain_loss(logits: torch.Tensor, ids: torch.Tensor, teacher_logits: Optional[torch.Tensor] = None,
                 weight: float = 0.0, temperature: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss and its detached parts {"ce", "kl"} ("kl" only with a teacher)."""
    ce = next_token_loss(logits, ids)
    if teacher_logits is None or weight == 0:
        return ce, {"ce": ce.detach()}
    kl = distill_kl(logits, teacher_logits, temperature)
    loss = kl if weight == 1 else (1 - weight) * ce + weight * kl  # w = 1: CE is only logged, not trained on
    return loss, {"ce": ce.detach(), "kl": kl.detach()}
