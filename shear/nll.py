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


def hidden_nll(head, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed NLL of `ids` [B, T] from the final hidden states [B, T, d] through `head` (the LM head),
    `LOGITS_CHUNK` positions at a time; a float64 scalar on the CPU."""
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = ids[:, 1:].reshape(-1)
    total = torch.zeros((), dtype=torch.float64)
    for i in range(0, len(targets), LOGITS_CHUNK):
        logits = head(hidden[i:i + LOGITS_CHUNK]).float()
        total += F.cross_entropy(logits, targets[i:i + LOGITS_CHUNK], reduction="sum").double().cpu()
    return total


@torch.no_grad()
def sequence_nll(model, ids: torch.Tensor, bos_token_id: int | None = None) -> tuple[float, int]:
    """(summed NLL, scored tokens) of each row of `ids` [B, T] as an independent sequence.

    With `bos_token_id` it is prepended to every row and the first token is scored too
    (T tokens per row), else tokens 2..T are (T - 1). The model has LLaMA's layout
    (`model.model` = the decoder, then the output embedding); no KV cache, no autocast.
    """
    device = model.get_input_embeddings().weight.device
    ids = ids.to(device=device, dtype=torch.long)
    if bos_token_id is not None:
        bos = torch.full((len(ids), 1), bos_token_id, dtype=torch.long, device=device)
        ids = torch.cat([bos, ids], dim=1)
    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
    return hidden_nll(model.get_output_embeddings(), hidden, ids).item(), ids.shape[0] * (ids.shape[1] - 1)
