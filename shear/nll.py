"""Next-token negative log-likelihood: the one loss every evaluation in shear measures.

Perplexity (shear.evaluate), the dynamic mixture's per-domain losses (shear.mixture, also
the training loops' held-out loss) and the perplexity-based block importance
(shear.importance.blocks) all sum the same quantity: -log p(token t+1 | tokens ..t),
natural log, with the log-softmax in float32 whatever the weights' dtype (bf16 logits
would round the loss of a 49k-token vocabulary by ~1e-2 nats), and the sums in float64.
The LM head runs over chunks of positions so the [tokens, vocab] logits never exist at once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOGITS_CHUNK = 2048  # positions per lm_head call: bounds the [tokens, vocab] logits in memory


def logits_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed NLL of `ids` [B, T] under `logits` [B, T, V] (position t predicts t+1), in float32."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")


def hidden_nll(head: torch.nn.Linear, hidden: torch.Tensor, ids: torch.Tensor,
               softcap: float | None = None) -> torch.Tensor:
    """Summed NLL of `ids` [B, T] from the final hidden states [B, T, d] through the LM `head`,
    `LOGITS_CHUNK` positions at a time, in float32 (no autocast); a float64 scalar on the CPU.
    `softcap`: the family's final logit soft-capping (Gemma: cap * tanh(logits / cap)), as the
    model's own forward applies it."""
    weight = head.weight.float()
    bias = head.bias.float() if head.bias is not None else None
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = ids[:, 1:].reshape(-1)
    total = torch.zeros((), dtype=torch.float64)
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        for i in range(0, len(targets), LOGITS_CHUNK):
            logits = F.linear(hidden[i:i + LOGITS_CHUNK].float(), weight, bias)
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            total += F.cross_entropy(logits, targets[i:i + LOGITS_CHUNK], reduction="sum").double().cpu()
    return total


def output_head(model) -> torch.nn.Module:
    """The LM head (`lm_head`) of a causal LM, also inside PEFT, DDP or FSDP wrappers."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "lm_head":
            return module
    raise ValueError(f"{type(model).__name__} has no lm_head module")


def final_softcap(model) -> float | None:
    """The family's final logit soft-capping (Gemma), read from the transformers model inside
    any PEFT, DDP or FSDP wrapper; None when the family has none."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "num_hidden_layers"):  # a transformers config, not PEFT's
            return getattr(config, "final_logit_softcapping", None)
    return None


@torch.no_grad()
def sequence_nll(model, ids: torch.Tensor, bos_token_id: int | None = None) -> tuple[float, int]:
    """(summed NLL, scored tokens) of each row of `ids` [B, T] as an independent sequence.

    With `bos_token_id` it is prepended to every row and the first token is scored too
    (T tokens per row), else tokens 2..T are (T - 1). The model runs its own forward (so
    PEFT, DDP, FSDP and autocast wrappers apply; no KV cache); a hook on its LM head scores
    the final hidden states in float32 chunks inside that forward (where a sharded head's
    weights are gathered) and lets the head itself compute one position only, so the
    [B, T, vocab] logits never exist.
    """
    device = next(model.parameters()).device
    ids = ids.to(device=device, dtype=torch.long)
    if bos_token_id is not None:
        bos = torch.full((len(ids), 1), bos_token_id, dtype=torch.long, device=device)
        ids = torch.cat([bos, ids], dim=1)
    scored, softcap = {}, final_softcap(model)

    def score(head, args):
        scored["nll"] = hidden_nll(head, args[0], ids, softcap)
        return (args[0][:, -1:],)

    hook = output_head(model).register_forward_pre_hook(score)
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        hook.remove()
    return scored["nll"].item(), ids.shape[0] * (ids.shape[1] - 1)
