"""Depth pruning: remove whole transformer blocks.

How many blocks (`blocks_to_remove`), which ones may go (`protected_blocks`,
`check_protected`), which ones do go (`select_blocks` one-shot from a scores record,
`prune_iterative` in rounds with re-scoring and optional healing), and the surgery itself
(`remove_blocks`, or `blocks_removed` to try a removal and undo it).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import torch
from tqdm import tqdm

from shear.config import BLOCK_CRITERIA
from shear.errors import ShearError


def _renumber(layers) -> None:
    """Set `layer_idx` to each layer's position: the KV cache indexes layers by it."""
    for new_idx, layer in enumerate(layers):
        layer.self_attn.layer_idx = new_idx
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new_idx


def remove_blocks(model, drop: list[int]):
    """Delete the blocks in `drop` in place; renumber `layer_idx` and update the config.

    transformers' KV cache indexes layers by `self_attn.layer_idx`, so the survivors must
    be renumbered 0..n-1 or generation with the cache reads the wrong slots.
    """
    n = model.config.num_hidden_layers
    drop = sorted(set(drop))
    if any(i < 0 or i >= n for i in drop):
        raise ValueError(f"block indices {drop} out of range for {n} blocks")
    keep = [i for i in range(n) if i not in drop]
    model.model.layers = torch.nn.ModuleList(model.model.layers[i] for i in keep)
    _renumber(model.model.layers)
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    return model


@contextlib.contextmanager
def blocks_removed(model, drop) -> Iterator:
    """Remove the blocks in `drop` for the duration of a `with` block, then put them back.

    Inside, the model is exactly the pruned model (same forward, same config), so scoring
    code can call `model(...)` or `model.model(inputs_embeds=...)` and let transformers
    build the attention mask and rotary embeddings itself.
    """
    config = model.config
    layers = model.model.layers
    num_layers, layer_types = config.num_hidden_layers, getattr(config, "layer_types", None)
    try:
        remove_blocks(model, list(drop))
        yield model
    finally:
        model.model.layers = layers
        config.num_hidden_layers = num_layers
        if layer_types is not None:
            config.layer_types = layer_types
        _renumber(layers)


# ----------------------------------------------------------------------------- how many, which


def blocks_to_remove(num_layers: int, block_params: int, ratio: float | None, num_blocks: int | None) -> int:
    """The number of blocks to remove: `num_blocks`, else `ratio` of the block parameters.

    LLaMA blocks all have the same size, so a fraction of the block parameters is that
    fraction of the blocks, rounded half up to a whole block (0.2 of 30 blocks -> 6).
    """
    if num_blocks is not None:
        n, setting = num_blocks, f"prune.depth.num_blocks={num_blocks}"
    elif ratio is not None:
        per_block = block_params / num_layers
        n = math.floor(ratio * block_params / per_block + 0.5)
        setting = f"prune.depth.ratio={ratio:g}"
    else:
        raise ShearError("params.yaml: depth pruning needs prune.depth.ratio in (0, 1) or prune.depth.num_blocks >= 1")
    valid = (f"valid: prune.depth.ratio in [{0.5 / num_layers:.3g}, {(num_layers - 0.5) / num_layers:.3g}) "
             f"or prune.depth.num_blocks in 1..{num_layers - 1}")
    if n < 1:
        raise ShearError(f"params.yaml: {setting} removes no block of {num_layers} (rounds to 0); {valid}")
    if n >= num_layers:
        raise ShearError(f"params.yaml: {setting} removes every block ({n} of {num_layers}); {valid}")
    return n


def target_setting(ratio: float | None, num_blocks: int | None, n: int) -> str:
    """How the user asked for `n` blocks, for error messages."""
    if num_blocks is not None:
        return f"prune.depth.num_blocks={num_blocks}"
    return f"prune.depth.ratio={ratio:g} ({n} blocks)"


def protected_blocks(criterion: str, num_layers: int, keep_first: int, keep_last: int) -> list[int]:
    """Blocks a criterion never removes: for the `+` criteria the first and last few (Shortened LLaMA)."""
    if criterion not in BLOCK_CRITERIA:
        raise ShearError(f"unknown block criterion {criterion!r}; valid: {', '.join(BLOCK_CRITERIA)}")
    if not criterion.endswith("+"):
        return []
    first = range(min(keep_first, num_layers))
    last = range(max(num_layers - keep_last, 0), num_layers)
    return sorted(set(first) | set(last))


def check_protected(n: int, num_layers: int, protected: list[int], criterion: str, setting: str) -> None:
    """Refuse to remove more blocks than the criterion leaves unprotected."""
    free = num_layers - len(protected)
    if n > free:
        valid = f"1..{free}" if free >= 1 else "none; lower score.keep_first or score.keep_last"
        raise ShearError(
            f"params.yaml: {setting} conflicts with {criterion} protecting {len(protected)} of {num_layers} blocks; "
            f"valid: {valid}"
        )


def lowest(scores: list[float], n: int, protected=()) -> list[int]:
    """The `n` unprotected blocks with the lowest scores (ties: the lower index), sorted."""
    protected = set(protected)
    candidates = [i for i in range(len(scores)) if i not in protected]
    return sorted(sorted(candidates, key=lambda i: (scores[i], i))[:n])


def select_blocks(record: dict, n: int, protected=()) -> list[int]:
    """One-shot choice from a scores record: its removal order when it has one (sleb), else the lowest."""
    order = record.get("removal_order")
    if order is not None:
        if len(order) < n:
            raise ShearError(
                f"reports/scores/block_{record['criterion']}.json: removal order has {len(order)} blocks, "
                f"{n} are asked for; re-run the score stage (dvc repro score)"
            )
        return sorted(order[:n])
    return lowest(record["scores"], n, protected)


def prune_iterative(model, n: int, first_scores: list[float], score_fn: Callable[[object, int], list[float]],
                    protected=(), per_round: int = 1,
                    heal: Callable[[object, int], tuple[object, dict]] | None = None,
                    done: Sequence[dict] = (), on_round: Callable[[object, list[dict]], None] | None = None,
                    ) -> tuple[object, list[int], list[dict]]:
    """Remove `n` blocks in rounds of `per_round`, re-scoring (and healing) between rounds.

    `first_scores` rank the blocks of the unpruned model; before every later round
    `score_fn(model, blocks_still_to_remove)` scores the blocks of the current, smaller (and
    healed) model. `heal(model, round)`, when given, trains the model after each round's
    removal and returns (the healed model, a summary for the record): prune-and-heal as
    Minitron advises beyond a third of the model. `protected` holds original block indices
    that are never removed. `done` continues a run from the round records it returned so far
    (`model` is then the model after them); `on_round(model, records)` is called after each
    round, e.g. to checkpoint. Returns the model, the original indices in removal order and,
    per round, the blocks it chose from (original indices), their scores, the blocks it
    removed and the healing summary.
    """
    rounds = list(done)
    removed = [b for r in rounds for b in r["removed"]]
    # the original index of each current block
    original = ([b for b in rounds[-1]["blocks"] if b not in rounds[-1]["removed"]] if rounds
                else list(range(model.config.num_hidden_layers)))
    protected = set(protected)
    total = math.ceil(n / per_round)
    for r in tqdm(range(len(rounds), total), desc="iterative pruning", unit="round", initial=len(rounds), total=total):
        scores = first_scores if r == 0 else score_fn(model, n - len(removed))
        candidates = [k for k, b in enumerate(original) if b not in protected]
        chosen = sorted(candidates, key=lambda k: (scores[k], k))[:min(per_round, n - len(removed))]
        record = {"blocks": list(original), "scores": [float(s) for s in scores],
                  "removed": [original[k] for k in chosen]}
        removed += record["removed"]
        remove_blocks(model, chosen)
        original = [b for k, b in enumerate(original) if k not in chosen]
        if heal is not None:
            model, record["heal"] = heal(model, r)
        rounds.append(record)
        if on_round is not None:
            on_round(model, rounds)
    return model, removed, rounds
