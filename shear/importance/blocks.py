"""Block importance: how much each transformer block matters, by nine criteria.

Every criterion returns one score per block, HIGHER = MORE IMPORTANT:

    ppl        perplexity on the calibration set with that block removed (Shortened LLaMA)
    taylor     sum over the block's weights of |W * dL/dW| (first-order Taylor, Shortened LLaMA)
    magnitude  sum over the block's weights of |W|
    bi         ShortGPT block influence, 1 - mean cos(block input, block output)
    angular    Gromov et al.: angular distance between the inputs of blocks l and l+n,
               spread over blocks so that the best span of n blocks scores lowest
    sleb       SLEB: greedily remove the block whose removal gives the lowest perplexity
    random     a seeded baseline
    ppl+, taylor+  the same scores, with the first and last few blocks protected

Fast perplexity: the hidden state entering block i is the same whether or not a later
block is removed, so one forward pass caches every block's input, and the model without
block i is scored by running only blocks i+1.. from the cached input of block i: about
half the work of the straightforward loop (`ppl_scores_loop`), with identical numbers.
That one forward pass is shared: `calibration_states` keeps it in the stage's memo, so ppl,
bi, angular and the unpruned perplexity (the last block's output through the final norm and
the head) cost one pass between them, as layer-by-layer scoring does.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from shear.config import BLOCK_CRITERIA
from shear.errors import ShearError
from shear.importance.width import width_taylor_scores
from shear.models import lm_logits
from shear.nll import logits_nll
from shear.plots import pyplot, save_png
from shear.prune.depth import blocks_removed, lowest, protected_blocks


def _batches(calib: torch.Tensor, batch_size: int, device):
    """Rows of the calibration set, `batch_size` at a time, on `device`."""
    for start in range(0, len(calib), batch_size):
        yield calib[start:start + batch_size].to(device)


def _device(model):
    return next(model.parameters()).device


def block_states(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Hidden states entering each block, plus the last block's output: L + 1 tensors [B, T, d].

    One forward pass with hooks, no KV cache; the last entry is before the final norm.
    """
    states = []

    def keep(module, args, output):
        # decoder layers return a tensor in transformers 5.x, a tuple in some older versions
        states.append(output[0] if isinstance(output, tuple) else output)

    modules = [model.model.embed_tokens, *model.model.layers]
    hooks = [m.register_forward_hook(keep) for m in modules]
    try:
        model.model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return states


def calibration_states(model, calib: torch.Tensor, batch_size: int,
                       memo: dict | None = None) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """(ids, block_states(ids)) of every calibration batch; computed once per `memo`.

    The states of the model as it is: criteria that score a changed model (sleb's later
    steps) pass no memo. Memory: (L + 1) hidden states per calibration token.
    """
    if memo is not None and "states" in memo:
        return memo["states"]
    states = [(ids, block_states(model, ids)) for ids in _batches(calib, batch_size, _device(model))]
    if memo is not None:
        memo["states"] = states
    return states


def _suffix_nll(model, hidden: torch.Tensor, first: int, ids: torch.Tensor) -> torch.Tensor:
    """NLL of `ids` when `hidden` enters block `first` and the blocks from there on run.

    The model's own forward builds the causal mask and rotary embeddings, so this stays
    correct across transformers versions and attention implementations.
    """
    with blocks_removed(model, range(first)):
        out = model.model(inputs_embeds=hidden, use_cache=False).last_hidden_state
    return logits_nll(lm_logits(model, out), ids)


@torch.no_grad()
def ppl_scores(model, calib: torch.Tensor, batch_size: int, progress: bool = True,
               memo: dict | None = None) -> list[float]:
    """Perplexity of the model with each block removed, from cached prefixes (fast path)."""
    L = model.config.num_hidden_layers
    nll = torch.zeros(L, dtype=torch.float64)
    for ids, states in calibration_states(model, calib, batch_size, memo):
        for i in tqdm(range(L), desc="ppl (fast)", unit="block", leave=False, disable=not progress):
            # without block i, block i+1 receives what block i received
            nll[i] += _suffix_nll(model, states[i], i + 1, ids).item()
    tokens = calib.shape[0] * (calib.shape[1] - 1)
    return [math.exp(v / tokens) for v in nll.tolist()]


@torch.no_grad()
def ppl_scores_loop(model, calib: torch.Tensor, batch_size: int, progress: bool = True) -> list[float]:
    """The straightforward loop: delete block i, run the whole model, put it back. Reference for tests."""
    L = model.config.num_hidden_layers
    nll = torch.zeros(L, dtype=torch.float64)
    for i in tqdm(range(L), desc="ppl (loop)", unit="block", leave=False, disable=not progress):
        with blocks_removed(model, [i]):
            for ids in _batches(calib, batch_size, _device(model)):
                nll[i] += logits_nll(model(input_ids=ids, use_cache=False).logits, ids).item()
    tokens = calib.shape[0] * (calib.shape[1] - 1)
    return [math.exp(v / tokens) for v in nll.tolist()]


@torch.no_grad()
def unpruned_ppl(model, calib: torch.Tensor, batch_size: int, memo: dict | None = None) -> float:
    """Perplexity of the model as it is, on the same calibration rows: the last block's output
    through the final norm and the head, as the fast path scores a model without a block."""
    L = model.config.num_hidden_layers
    nll = 0.0
    for ids, states in calibration_states(model, calib, batch_size, memo):
        nll += _suffix_nll(model, states[L], L, ids).item()
    return math.exp(nll / (calib.shape[0] * (calib.shape[1] - 1)))


def sleb_scores(model, calib: torch.Tensor, batch_size: int, n: int,
                first: list[float] | None = None) -> tuple[list[float], list[int]]:
    """SLEB: remove, n times, the block whose removal gives the lowest calibration perplexity.

    Each step re-scores the remaining blocks of the already-pruned model with the fast
    path. A removed block's score is the perplexity after its removal; a kept block's is
    the perplexity its removal would have given at the last step (so it is at least the
    last removed block's). `first` may pass the unpruned model's `ppl_scores`, which are
    the first step's. Returns (scores, removal order).
    """
    def step_scores(removed: list[int]) -> list[float]:
        with blocks_removed(model, removed):
            return ppl_scores(model, calib, batch_size)

    return sleb_greedy(model.config.num_hidden_layers, n, step_scores, first)


def sleb_greedy(num_layers: int, n: int, step_scores: Callable[[list[int]], list[float]],
                first: list[float] | None = None) -> tuple[list[float], list[int]]:
    """SLEB's greedy loop: `step_scores(removed)` gives the perplexity without each remaining block
    of the model with `removed` already gone; returns (scores, removal order) as `sleb_scores`."""
    remaining, order = list(range(num_layers)), []
    scores = [0.0] * num_layers
    for k in tqdm(range(n), desc="sleb", unit="step"):
        step = first if k == 0 and first is not None else step_scores(list(order))
        for b, s in zip(remaining, step):
            scores[b] = s
        best = min(range(len(remaining)), key=lambda k: (step[k], k))
        order.append(remaining.pop(best))
    return scores, order


def taylor_scores(model, calib: torch.Tensor, batch_size: int, memo: dict | None = None) -> list[float]:
    """First-order Taylor importance: sum over the block's parameters of |W * dL/dW|.

    As in Shortened LLaMA's code: the gradient of the LM loss (here its mean over the
    calibration sequences) is taken, each element's first-order term W * g is taken in
    absolute value and summed over the block. That is the `layers` entry of LLM-Pruner's
    width Taylor scores, which come from the same gradient: one backward pass gives both,
    and `memo["width_taylor"]` keeps the width scores for the width criterion.
    """
    scores = width_taylor_scores(model, calib, batch_size)
    if memo is not None:
        memo["width_taylor"] = scores
    return scores["layers"].tolist()


@torch.no_grad()
def magnitude_scores(model) -> list[float]:
    """Sum of |W| over every parameter of each block (Shortened LLaMA's magnitude baseline)."""
    return [block_magnitude(layer) for layer in model.model.layers]


def block_magnitude(layer) -> float:
    """Sum of |W| over every parameter of one block."""
    return sum(p.float().abs().sum().item() for p in layer.parameters())


@torch.no_grad()
def bi_scores(model, calib: torch.Tensor, batch_size: int, memo: dict | None = None) -> list[float]:
    """ShortGPT block influence: 1 - cosine(input, output) of each block, averaged over all tokens."""
    L = model.config.num_hidden_layers
    cos_sum, count = torch.zeros(L, dtype=torch.float64), 0
    for ids, states in calibration_states(model, calib, batch_size, memo):
        for i in range(L):
            cos_sum[i] += cosine_sum(states[i], states[i + 1])
        count += ids.numel()
    return (1 - cos_sum / count).tolist()


def cosine_sum(block_in: torch.Tensor, block_out: torch.Tensor) -> float:
    """Sum over tokens of cos(block input, block output), in float32 (block influence's statistic)."""
    return F.cosine_similarity(block_in.float(), block_out.float(), dim=-1).sum().item()


def angular_distance_sum(first: torch.Tensor, last: torch.Tensor) -> float:
    """Sum over sequences of arccos(cos(x_l, x_{l+n})) / pi at each sequence's last token."""
    cos = F.cosine_similarity(first[:, -1].float(), last[:, -1].float(), dim=-1)
    return (torch.arccos(cos.clamp(-1, 1)) / math.pi).sum().item()


def angular_from_distances(dist: list[float], num_layers: int, n: int) -> tuple[list[float], list[int]]:
    """Per-block scores (the smallest mean distance of a span containing the block) and the best span."""
    L = num_layers
    scores = [min(dist[s] for s in range(max(0, b - n + 1), min(b, L - n) + 1)) for b in range(L)]
    best = min(range(L - n + 1), key=lambda s: (dist[s], s))
    return scores, list(range(best, best + n))


@torch.no_grad()
def angular_scores(model, calib: torch.Tensor, batch_size: int, n: int,
                   memo: dict | None = None) -> tuple[list[float], list[int]]:
    """Gromov et al.: remove the n consecutive blocks whose input and output are closest.

    d(l) = arccos(cos(x_l, x_{l+n})) / pi on the last token of each sequence, averaged
    over the calibration set, where x_l is the input of block l. A block's score is the
    smallest d over the spans that contain it, so the n blocks of the best span score
    lowest. Returns (scores, the best span's blocks).
    """
    L = model.config.num_hidden_layers
    dist, count = torch.zeros(L - n + 1, dtype=torch.float64), 0
    for ids, states in calibration_states(model, calib, batch_size, memo):
        for start in range(L - n + 1):
            dist[start] += angular_distance_sum(states[start], states[start + n])
        count += ids.shape[0]
    return angular_from_distances((dist / count).tolist(), L, n)


def random_scores(num_layers: int, seed: int) -> list[float]:
    """Seeded uniform scores: the baseline every criterion should beat."""
    return torch.rand(num_layers, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).tolist()


def block_scores(model, calib: torch.Tensor, criterion: str, *, n: int, batch_size: int, seed: int = 0,
                 memo: dict | None = None) -> tuple[list[float], dict]:
    """Every block's score by `criterion` (a `+` variant scores as its base), and the criterion's
    extras for the record (angular's span, sleb's removal order).

    `n` is the number of blocks that will be removed (angular's span length, sleb's steps).
    `memo` (optional) keeps scores already computed on this model and data so that
    `ppl+` and `taylor+` reuse those of `ppl` and `taylor`, sleb its first step, and the
    width `taylor` criterion the gradient pass of the block one (`memo["width_taylor"]`).
    """
    if criterion not in BLOCK_CRITERIA:
        raise ShearError(f"unknown block criterion {criterion!r}; valid: {', '.join(BLOCK_CRITERIA)}")
    L = model.config.num_hidden_layers
    base = criterion.rstrip("+")
    memo = {} if memo is None else memo
    record = {}
    if base in memo:
        scores = memo[base]
    elif base == "ppl":
        scores = ppl_scores(model, calib, batch_size, memo=memo)
    elif base == "taylor":
        scores = taylor_scores(model, calib, batch_size, memo)
    elif base == "magnitude":
        scores = magnitude_scores(model)
    elif base == "bi":
        scores = bi_scores(model, calib, batch_size, memo)
    elif base == "angular":
        scores, record["span"] = angular_scores(model, calib, batch_size, n, memo)
    elif base == "sleb":
        scores, record["removal_order"] = sleb_scores(model, calib, batch_size, n, first=memo.get("ppl"))
    else:  # random
        scores = random_scores(L, seed)
    if base in ("ppl", "taylor"):
        memo[base] = scores
    return scores, record


def score_blocks(model, calib: torch.Tensor, criterion: str, *, n: int, batch_size: int,
                 keep_first: int = 4, keep_last: int = 2, seed: int = 0, memo: dict | None = None) -> dict:
    """Score every block by `criterion`; the record written to reports/scores/block_<criterion>.json.

    Arguments as `block_scores`; the record adds the unpruned perplexity (ppl and sleb, for
    the plot), the blocks `keep_first`/`keep_last` protect and the calibration size.
    """
    memo = {} if memo is None else memo
    scores, extras = block_scores(model, calib, criterion, n=n, batch_size=batch_size, seed=seed, memo=memo)
    if criterion.rstrip("+") in ("ppl", "sleb") and "unpruned_ppl" not in memo:
        memo["unpruned_ppl"] = unpruned_ppl(model, calib, batch_size, memo)
    return block_record(criterion, scores, extras, memo, calib, n=n, keep_first=keep_first, keep_last=keep_last)


def block_record(criterion: str, scores: list[float], extras: dict, memo: dict, calib: torch.Tensor, *,
                 n: int, keep_first: int, keep_last: int) -> dict:
    """The scores record of one criterion (whole-model or layer-by-layer scoring alike)."""
    record = {"criterion": criterion, **extras}
    if criterion.rstrip("+") in ("ppl", "sleb"):
        record["unpruned_ppl"] = memo["unpruned_ppl"]
    record.update({
        "scores": [float(s) for s in scores],
        "protected": protected_blocks(criterion, len(scores), keep_first, keep_last),
        "num_blocks": n,
        "calibration": {"sequences": int(calib.shape[0]), "seq_len": int(calib.shape[1])},
    })
    return record


def removed_by(record: dict) -> list[int]:
    """The blocks a one-shot prune would remove by this record (none when protection forbids n)."""
    n, protected = record["num_blocks"], record["protected"]
    if "removal_order" in record:
        return sorted(record["removal_order"][:n])
    if n > len(record["scores"]) - len(protected):
        return []
    return lowest(record["scores"], n, protected)


def plot_block_scores(record: dict, path: str | Path) -> None:
    """Bar chart of importance per block: removed blocks red, protected ones grey."""
    scores, removed, protected = record["scores"], set(removed_by(record)), set(record["protected"])
    colors = ["tab:red" if i in removed else "tab:gray" if i in protected else "tab:blue" for i in range(len(scores))]
    fig, ax = pyplot().subplots(figsize=(max(6, 0.3 * len(scores)), 3.5))
    ax.bar(range(len(scores)), scores, color=colors)
    title = f"{record['criterion']}: red = the {len(removed)} removed" + (", grey = protected" if protected else "")
    ylabel = "importance (higher = keep)"
    if "unpruned_ppl" in record:
        ax.set_yscale("log")  # removing an early block can raise perplexity 1000-fold
        ax.axhline(record["unpruned_ppl"], color="black", lw=0.8, ls="--")
        title += ", dashed = unpruned model"
        ylabel = "perplexity without the block"
    ax.set_xlabel("block")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    save_png(fig, path)
