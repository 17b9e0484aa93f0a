"""Depth pruning: remove whole transformer blocks."""
from __future__ import annotations

import torch


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
    for new_idx, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_idx
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new_idx
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    return model
