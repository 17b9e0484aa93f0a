"""Width pruning: slice attention heads, MLP neurons and hidden channels out of a model of a
supported family (LLaMA's block layout; see `shear.models.layout` for what differs).

`slice_model` cuts the weights to the units listed in `keep`; `width_prune` picks those
units from importance scores (shear/importance/width.py), the same number in every layer,
so the result is a standard checkpoint of the same class and exactly the target shape.

What a removed unit means (the sliced model equals the unsliced model with these zeroed;
every other bias stays as it is):
- a query head: its o_proj input columns (its contribution to the residual stream; its q
  bias and q_norm then act on nothing);
- a KV group: the o_proj columns of every query head reading it (and its k/v rows);
- an MLP neuron: its down_proj input column;
- a hidden channel: that channel everywhere in the residual stream (embedding column,
  o_proj and down_proj output rows and their bias entries), so it stays zero; RMSNorm still
  averages over all d channels, which the rescaled norm weights and epsilon of the sliced
  model reproduce. (Its bias entries must go with it: a bias alone would put a constant into
  the removed channel that every later norm's mean would see.)
"""
from __future__ import annotations

import math

import torch

from shear.models import block_norms, head_dim, layout
from shear.prune.depth import remove_blocks
from shear.prune.shapes import source_shape


def _slice_linear(linear: torch.nn.Linear, rows=None, cols=None) -> None:
    """Keep output features `rows` and input features `cols` of a Linear layer, in place."""
    w = linear.weight.data
    if rows is not None:
        w = w[rows]
        if linear.bias is not None:
            linear.bias = torch.nn.Parameter(linear.bias.data[rows].clone(), requires_grad=linear.bias.requires_grad)
    if cols is not None:
        w = w[:, cols]
    linear.weight = torch.nn.Parameter(w.clone(), requires_grad=linear.weight.requires_grad)
    linear.out_features, linear.in_features = linear.weight.shape


def _head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    """The rows of a projection that belong to `heads` (each head is `head_dim` consecutive rows)."""
    return torch.tensor([h * head_dim + j for h in heads for j in range(head_dim)], dtype=torch.long)


def _uniform(lists, what: str) -> int:
    """The common length of per-layer lists; width pruning must keep the same count everywhere."""
    counts = {len(x) for x in lists}
    if len(counts) != 1:
        raise ValueError(f"keep[{what!r}] keeps different counts per layer {sorted(counts)}; a LLaMA config needs one")
    return counts.pop()


def _resolve_heads(keep: dict, n_layers: int, n_heads: int, n_kv: int) -> tuple[list, list] | None:
    """Per layer: (sorted kept KV heads, sorted kept query heads), consistent with GQA.

    Missing `kv_heads` = the groups that still own a kept query head; missing `heads` = every
    query head of the kept groups. Every kept group must keep the same number of query heads.
    """
    if keep.get("heads") is None and keep.get("kv_heads") is None:
        return None
    group = n_heads // n_kv
    kv_lists, head_lists = [], []
    for i in range(n_layers):
        heads = sorted(keep["heads"][i]) if keep.get("heads") is not None else None
        if keep.get("kv_heads") is not None:
            kv = sorted(keep["kv_heads"][i])
        else:
            kv = sorted({h // group for h in heads})
        if heads is None:
            heads = [g * group + j for g in kv for j in range(group)]
        per_group = [sum(1 for h in heads if h // group == g) for g in kv]
        if any(h // group not in kv for h in heads) or len(set(per_group)) != 1 or per_group[0] == 0:
            raise ValueError(f"layer {i}: query heads {heads} do not keep the same number of heads in each kept "
                             f"KV group {kv} (groups of {group})")
        kv_lists.append(kv)
        head_lists.append(heads)
    return kv_lists, head_lists


@torch.no_grad()
def slice_model(model, keep: dict):
    """Cut `model` (LLaMA layout) in place to the units in `keep`; returns it.

    keep = {"layers": [kept layer idx] | None, "kv_heads": [[kept kv head idx] per kept layer] | None,
            "heads": [[kept query head idx] per kept layer] | None, "mlp": [[kept neuron idx] per kept
            layer] | None, "hidden": [kept channel idx] | None}; None keeps everything. Indices are
    the source's. Updates the config (explicit head_dim) and renumbers `layer_idx`.
    """
    config = model.config
    hd = head_dim(config)
    if keep.get("layers") is not None:
        layers = sorted(keep["layers"])
        remove_blocks(model, [i for i in range(config.num_hidden_layers) if i not in set(layers)])
    layers = model.model.layers
    n = len(layers)
    for key in ("heads", "kv_heads", "mlp"):
        if keep.get(key) is not None and len(keep[key]) != n:
            raise ValueError(f"keep[{key!r}] has {len(keep[key])} per-layer lists for {n} kept layers")

    heads = _resolve_heads(keep, n, config.num_attention_heads, config.num_key_value_heads)
    if heads is not None:
        kv_lists, head_lists = heads
        n_kv, n_heads = _uniform(kv_lists, "kv_heads"), _uniform(head_lists, "heads")
        for layer, kv, qh in zip(layers, kv_lists, head_lists):
            attn = layer.self_attn
            _slice_linear(attn.q_proj, rows=_head_rows(qh, hd))
            _slice_linear(attn.k_proj, rows=_head_rows(kv, hd))
            _slice_linear(attn.v_proj, rows=_head_rows(kv, hd))
            _slice_linear(attn.o_proj, cols=_head_rows(qh, hd))
            attn.num_key_value_groups = n_heads // n_kv
            for name, value in (("num_heads", n_heads), ("num_key_value_heads", n_kv)):
                if hasattr(attn, name):  # older transformers keep these on the module
                    setattr(attn, name, value)
        config.num_attention_heads, config.num_key_value_heads = n_heads, n_kv

    if keep.get("mlp") is not None:
        size = _uniform(keep["mlp"], "mlp")
        for layer, neurons in zip(layers, keep["mlp"]):
            idx = torch.tensor(sorted(neurons), dtype=torch.long)
            _slice_linear(layer.mlp.gate_proj, rows=idx)
            _slice_linear(layer.mlp.up_proj, rows=idx)
            _slice_linear(layer.mlp.down_proj, cols=idx)
            if hasattr(layer.mlp, "intermediate_size"):
                layer.mlp.intermediate_size = size
        config.intermediate_size = size

    if keep.get("hidden") is not None:
        _slice_hidden(model, torch.tensor(sorted(keep["hidden"]), dtype=torch.long))

    config.head_dim = hd  # transformers would otherwise derive hidden_size // heads
    return model


def scale_norm(norm, factor: torch.Tensor, unit_offset: bool) -> None:
    """Multiply an RMSNorm's output by `factor` (per channel or scalar) through its weight:
    w * f, or for a (1 + w) norm (Gemma 3) w' = (1 + w) * f - 1."""
    w = norm.weight
    f = factor.to(w)
    w.copy_((1 + w) * f - 1 if unit_offset else w * f)


def _slice_hidden(model, idx: torch.Tensor) -> None:
    """Keep hidden channels `idx` everywhere; rescale RMSNorms so they still match the full width.

    RMSNorm(x) = w * x / sqrt(mean(x^2) + eps). With the removed channels zero, the mean over d
    channels is (d'/d) times the mean over the d' kept ones, so w' = w * sqrt(d/d') and
    eps' = eps * d/d' give the same output on the kept channels; a Gemma 3 norm scales by
    (1 + w), so there (1 + w') = (1 + w) * sqrt(d/d'). Every hidden-sized norm is rescaled (Gemma's
    post norms see o_proj / down_proj outputs whose removed rows are zero too); q_norm / k_norm
    act on head_dim and keep their weights, but share `rms_norm_eps`, so they see eps * d/d'
    (a relative change of order eps, far below float32 rounding).
    Gemma 3 multiplies embeddings by sqrt(hidden_size), which the sliced config makes sqrt(d'):
    the embedding is multiplied by sqrt(d/d') to compensate and, when it is tied to the LM
    head, the final norm by sqrt(d'/d) so the logits stay the same.
    """
    config = model.config
    d, d_new = config.hidden_size, len(idx)
    facts = layout(config)
    tied = model.get_output_embeddings() is not None and \
        model.get_output_embeddings().weight is model.get_input_embeddings().weight
    scale, eps = math.sqrt(d / d_new), config.rms_norm_eps * d / d_new

    def norm(module, factor: float):
        module.weight = torch.nn.Parameter(module.weight.data[idx].clone(), requires_grad=module.weight.requires_grad)
        scale_norm(module, torch.tensor(factor, dtype=torch.float64), facts["unit_offset_norm"])
        setattr(module, "eps" if hasattr(module, "eps") else "variance_epsilon", eps)  # Gemma 3 names it eps

    emb = model.get_input_embeddings()
    emb.weight = torch.nn.Parameter(emb.weight.data[:, idx].clone(), requires_grad=emb.weight.requires_grad)
    emb.embedding_dim = d_new
    if facts["embed_scale"]:  # the loaded model will scale by sqrt(d'), not sqrt(d)
        emb.weight.data.mul_(scale)
        emb.scalar_embed_scale = d_new ** 0.5
        emb.embed_scale.fill_(d_new ** 0.5)
    for layer in model.model.layers:
        for module in block_norms(layer):
            norm(module, scale)
        attn, mlp = layer.self_attn, layer.mlp
        for linear in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            _slice_linear(linear, cols=idx)
        _slice_linear(attn.o_proj, rows=idx)
        _slice_linear(mlp.down_proj, rows=idx)
        for module in (layer, mlp):
            if hasattr(module, "hidden_size"):
                module.hidden_size = d_new
    norm(model.model.norm, 1.0 if facts["embed_scale"] and tied else scale)
    head = model.get_output_embeddings()
    if tied:
        head.weight = emb.weight
        head.in_features = d_new
    elif head is not None:
        _slice_linear(head, cols=idx)
    config.hidden_size, config.rms_norm_eps = d_new, eps


# ----------------------------------------------------------------------------- one-shot pruning


def _topk(values: torch.Tensor, k: int) -> list[int]:
    """Indices of the k largest values, ties to the lower index, sorted."""
    order = sorted(range(len(values)), key=lambda i: (-float(values[i]), i))
    return sorted(order[:k])


def choose_units(scores: dict, source: dict, target: dict) -> dict:
    """The `keep` dict for `slice_model`: the most important units, the same count in every layer.

    GQA: with r' = target heads / target KV heads query heads per kept group, a KV group is
    worth its top-r' query heads plus its own k/v part (the KV score minus its heads' scores),
    the best groups are kept, and in each the top-r' query heads.
    """
    n_layers = source["num_hidden_layers"]
    layers = list(range(n_layers))
    if target["num_hidden_layers"] < n_layers:
        layers = _topk(scores["layers"], target["num_hidden_layers"])
    group = source["num_attention_heads"] // source["num_key_value_heads"]
    n_kv = target["num_key_value_heads"]
    per_group = target["num_attention_heads"] // n_kv
    keep = {"layers": layers, "kv_heads": [], "heads": [], "mlp": [], "hidden": None}
    for i in layers:
        head_scores = scores["heads"][i].double().view(-1, group)  # [kv groups, heads per group]
        kv_part = scores["kv_heads"][i].double() - head_scores.sum(1)
        best_in_group = [_topk(g, per_group) for g in head_scores]
        worth = torch.stack([kv_part[g] + head_scores[g, best_in_group[g]].sum() for g in range(len(head_scores))])
        kv = _topk(worth, n_kv)
        keep["kv_heads"].append(kv)
        keep["heads"].append([g * group + j for g in kv for j in best_in_group[g]])
        keep["mlp"].append(_topk(scores["mlp"][i], target["intermediate_size"]))
    if target["hidden_size"] < source["hidden_size"]:
        keep["hidden"] = _topk(scores["hidden"], target["hidden_size"])
    return keep


def width_prune(model, target_shape: dict, scores: dict):
    """One-shot uniform width pruning of `model` to `target_shape` by importance `scores`.

    `scores` is `read_width_scores(...)` of this model. Returns (model, record) where the
    record says what was kept; when the target has fewer layers, the layers with the lowest
    layer score of the same criterion (see shear/importance/width.py) are dropped and listed.
    """
    source = source_shape(model.config)
    expected = {"heads": (source["num_hidden_layers"], source["num_attention_heads"]),
                "kv_heads": (source["num_hidden_layers"], source["num_key_value_heads"]),
                "mlp": (source["num_hidden_layers"], source["intermediate_size"]),
                "hidden": (source["hidden_size"],), "layers": (source["num_hidden_layers"],)}
    for key, shape in expected.items():
        if tuple(scores[key].shape) != shape:
            raise ValueError(f"width scores {key!r} have shape {tuple(scores[key].shape)}, the model needs {shape}")
    keep = choose_units(scores, source, target_shape)
    slice_model(model, keep)
    removed_layers = [i for i in range(source["num_hidden_layers"]) if i not in keep["layers"]]
    record = {
        "method": "width",
        "source_shape": source,
        "target_shape": dict(target_shape),
        "removed_layers": removed_layers,
        "layer_scores": [float(f"{float(x):.6g}") for x in scores["layers"]],
        "kept": keep,
    }
    return model, record
