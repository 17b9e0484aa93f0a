"""Hard-concrete (L0) masks for Sheared-LLaMA's targeted structured pruning.

A mask unit (a layer, a head, an MLP neuron, a hidden channel) has a learned
log-alpha. During training its mask value z is a sample of the hard-concrete
distribution (Louizos et al., 2018): a binary-concrete sample stretched to
(-0.1, 1.1) and clipped to [0, 1], so z is exactly 0 or 1 with positive probability
and differentiable in log-alpha. The expected number of non-zero units (expected L0)
is closed-form, which lets a Lagrangian push the expected shape to a target shape.

Mask types, following the reference code (princeton-nlp/LLM-Shearing, pruning modules
`[layer, head, intermediate, hidden]`):

    layer    [L]      one mask per block, scales both the attention and the MLP output
    head     [L, H]   query heads (o_proj input, per head)
    kv_head  [L, K]   GQA only, when the target has fewer KV heads: whole KV groups
    mlp      [L, I]   MLP neurons (down_proj input)
    hidden   [d]      hidden channels (embedding, residual contributions, final norm)

GQA (our addition; the paper prunes multi-head LLaMA-2): query head h belongs to KV group
h // g with g = H / K. The target keeps g' = H' / K' query heads in each of K' groups.
The `head` mask learns which query heads survive inside a group, and its constraint is
per group: each KV group's expected kept heads is pushed to g' (expected sparsity
1 - g'/g in every group), so the training objective has no reason to move heads from one
group to another, which the cut could not honour. When K' < K a `kv_head` mask learns
which whole groups survive (expected sparsity 1 - K'/K per layer); the `head` mask then
says which heads a group keeps if it survives. The cut keeps the K' best groups and, in
each, the g' heads with the highest scores, so the pruned model always has H' % K' == 0
and the heads it keeps are the ones training kept. A multi-head model (g = 1) needs no
`kv_head` mask: the whole layer is one selection group, its constraint the paper's
per-layer one, and the cut keeps the H' best heads of a layer.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from shear.errors import ShearError
from shear.models import PLAIN_LAYOUT, residual_writers
from shear.prune.shapes import SHAPE_KEYS, block_parameters
from shear.prune.width import scale_norm

# Hard-concrete constants of the reference code.
STRETCH = (-0.1, 1.1)
EPSILON = 1e-6
# log-alpha starts at 5 (+ N(0, 0.01) noise) and is clamped to [log 1e-2, log 1e2], so every
# unit starts kept: P(z > 0) ~ 0.998 and the sampled z is 1 for ~95% of draws.
INIT_LOG_ALPHA = 5.0
INIT_NOISE = 1e-2
LOG_ALPHA_RANGE = (math.log(1e-2), math.log(1e2))
# Deterministic score sigmoid(log_alpha / temperature * 0.8): the reference's ("magical number").
SCORE_SHARPNESS = 0.8

MASK_TYPES = ("layer", "head", "kv_head", "mlp", "hidden")


class HardConcrete(nn.Module):
    """Hard-concrete masks of one type: log-alpha of shape [rows, n] (or [n]), one mask per unit.

    Units are constrained and selected in groups of `group_size` consecutive units of a row
    (the whole row by default; the query heads of one KV group for GQA head masks).
    """

    def __init__(self, shape: tuple[int, ...], temperature: float, generator: torch.Generator,
                 group_size: int | None = None):
        super().__init__()
        init = INIT_LOG_ALPHA + INIT_NOISE * torch.randn(shape, generator=generator)
        self.log_alpha = nn.Parameter(init)
        self.temperature = temperature
        self.group_size = group_size or shape[-1]

    def constrain(self) -> None:
        """Clamp log-alpha into the reference's range (done before every use, as it does)."""
        with torch.no_grad():
            self.log_alpha.clamp_(*LOG_ALPHA_RANGE)

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        """One hard-concrete draw z in [0, 1] per unit, differentiable in log-alpha."""
        u = torch.rand(self.log_alpha.shape, generator=generator).clamp(EPSILON, 1 - EPSILON)
        u = u.to(self.log_alpha.device)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.temperature)
        low, high = STRETCH
        return (s * (high - low) + low).clamp(0.0, 1.0)

    def expected_score(self) -> torch.Tensor:
        """P(z > 0) per unit: 1 - CDF of the stretched concrete at 0; its sum is the expected L0."""
        low, high = STRETCH
        x = (0 - low) / (high - low)
        cdf0 = torch.sigmoid(math.log(x / (1 - x)) * self.temperature - self.log_alpha)
        return 1 - cdf0.clamp(EPSILON, 1 - EPSILON)

    def grouped(self, values: torch.Tensor) -> torch.Tensor:
        """Per-unit values [..., n] viewed as [..., n / group_size, group_size]: one row per selection group."""
        return values.unflatten(-1, (-1, self.group_size))

    def expected_sparsity(self) -> torch.Tensor:
        """Expected fraction of pruned units per selection group: [rows, groups], or [1] for a 1-D mask."""
        return 1 - self.grouped(self.expected_score()).mean(-1)

    def score(self) -> torch.Tensor:
        """Deterministic mask value of a kept unit (the reference's soft mask)."""
        return torch.sigmoid(self.log_alpha / self.temperature * SCORE_SHARPNESS)


def top_k_mask(scores: torch.Tensor, k) -> torch.Tensor:
    """Boolean mask keeping the k highest scores in each row (last dimension); k an int or one per row."""
    rank = torch.argsort(torch.argsort(scores, dim=-1, descending=True, stable=True), dim=-1)
    k = torch.as_tensor(k, device=scores.device)
    return rank < (k.unsqueeze(-1) if k.dim() else k)


def check_target(source: dict, target: dict) -> None:
    """Refuse a target the masks cannot reach: larger than the source, another head_dim, uneven groups."""
    for key in SHAPE_KEYS:
        if not 1 <= target[key] <= source[key]:
            raise ShearError(f"params.yaml: prune.target gives {key}={target[key]}; sheared pruning needs "
                             f"1..{source[key]} (the base model's {key})")
    if target["head_dim"] != source["head_dim"]:
        raise ShearError(f"params.yaml: prune.target has head_dim {target['head_dim']}; sheared pruning keeps "
                         f"the base model's head_dim {source['head_dim']}")
    g = source["num_attention_heads"] // source["num_key_value_heads"]
    h_t, k_t = target["num_attention_heads"], target["num_key_value_heads"]
    if h_t % k_t or h_t // k_t > g:
        raise ShearError(f"params.yaml: prune.target has {h_t} heads over {k_t} KV heads; valid: a multiple of "
                         f"{k_t} up to {k_t * g} ({g} query heads per KV head in the base model)")


class L0Masks(nn.Module):
    """Every mask type of one pruning run, its target counts and its Lagrange multipliers.

    `source` and `target` are shape dicts (keys of `SHAPE_KEYS`); the target must be reachable
    by pruning units (see `check_target`). `layout` is the block layout of the source
    (`shear.models.layout`: biases, norms), which the size counts include.
    """

    def __init__(self, source: dict, target: dict, temperature: float = 2 / 3, seed: int = 0,
                 layout: dict = PLAIN_LAYOUT):
        super().__init__()
        check_target(source, target)
        self.source = {k: int(source[k]) for k in SHAPE_KEYS}
        self.target = {k: int(target[k]) for k in SHAPE_KEYS}
        self.layout = dict(layout)
        L, d = self.source["num_hidden_layers"], self.source["hidden_size"]
        H, K = self.source["num_attention_heads"], self.source["num_key_value_heads"]
        self.group = H // K
        # Kept units per row of each mask type, and the mask shapes.
        shapes = {"layer": (L,), "head": (L, H), "mlp": (L, self.source["intermediate_size"]), "hidden": (d,)}
        self.keep = {"layer": self.target["num_hidden_layers"], "mlp": self.target["intermediate_size"],
                     "hidden": self.target["hidden_size"]}
        if self.group > 1 and self.target["num_key_value_heads"] < K:
            shapes["kv_head"] = (L, K)
            self.keep["kv_head"] = self.target["num_key_value_heads"]
        # Query heads kept per selection group: g' per KV group, or H' per layer when g == 1.
        self.keep["head"] = (self.target["num_attention_heads"] // self.target["num_key_value_heads"]
                             if self.group > 1 else self.target["num_attention_heads"])
        group_size = {"head": self.group if self.group > 1 else H}
        generator = torch.Generator().manual_seed(seed)
        self.masks = nn.ModuleDict({name: HardConcrete(shapes[name], temperature, generator, group_size.get(name))
                                    for name in MASK_TYPES if name in shapes})
        self.lambdas = nn.ParameterDict({f"{name}_{i}": nn.Parameter(torch.zeros(()))
                                         for name in self.masks for i in (1, 2)})

    # ------------------------------------------------------------------ training-time quantities

    def constrain(self) -> None:
        """Clamp every log-alpha into range."""
        for mask in self.masks.values():
            mask.constrain()

    def sample(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """A hard-concrete draw of every mask type (one draw per step, shared by the batch)."""
        return {name: mask.sample(generator) for name, mask in self.masks.items()}

    def target_sparsity(self, progress: float = 1.0) -> dict[str, float]:
        """Fraction of units each mask type must prune (1 - kept / total per selection group), times `progress`.

        `progress` in [0, 1] is the Lagrangian warm-up: the target ramps linearly from 0.
        """
        return {name: (1 - self.keep[name] / mask.group_size) * progress for name, mask in self.masks.items()}

    def lagrangian(self, progress: float) -> torch.Tensor:
        """Sum over mask types of lambda1 (s - t) + lambda2 (s - t)^2, averaged over selection groups.

        s is the expected sparsity of a selection group (a layer's row, or one KV group's query
        heads under GQA), t its (warmed-up) target sparsity: the reference's per-layer
        constraint, made per KV group so that training aims at the shape the cut produces.
        The multipliers stay one pair per mask type, as in the paper: lambda1 weighs the mean
        gap, and the quadratic term, whose lambda2 grows while any gap remains, evens out the
        groups (as it evens out the paper's layers).
        """
        total = 0.0
        for name, t in self.target_sparsity(progress).items():
            gap = self.masks[name].expected_sparsity() - t
            total = total + (self.lambdas[f"{name}_1"] * gap + self.lambdas[f"{name}_2"] * gap ** 2).mean()
        return total

    def expected_scores(self) -> dict[str, torch.Tensor]:
        """P(z > 0) of every unit, per mask type."""
        return {name: mask.expected_score() for name, mask in self.masks.items()}

    # ------------------------------------------------------------------ deterministic masks

    def deterministic(self, exact: bool) -> dict[str, torch.Tensor]:
        """Deterministic mask values: the soft score of kept units, 0 for pruned ones.

        Units are chosen per selection group (a row; one KV group's query heads under GQA) by
        their score. exact=True keeps the target count of each type (the K' best KV groups and
        the g' best query heads inside each). exact=False keeps, per selection group, the
        rounded expected L0: the model as it currently stands (used for held-out losses).
        """
        with torch.no_grad():
            out = {}
            for name, mask in self.masks.items():
                scores = mask.score()
                count = self.keep[name] if exact else mask.grouped(mask.expected_score()).sum(-1).round().long()
                keep = top_k_mask(mask.grouped(scores), count).flatten(-2)
                out[name] = torch.where(keep, scores, torch.zeros_like(scores))
            return out

    def kept_units(self, z: dict[str, torch.Tensor]) -> dict:
        """Indices of the units kept by exact deterministic masks, in `slice_model`'s `keep` format."""
        layers = torch.nonzero(z["layer"]).flatten().tolist()
        heads = self.effective_heads(z) != 0                          # [L, H]
        groups = heads.view(heads.shape[0], -1, self.group).any(-1)   # [L, K]
        return {
            "layers": layers,
            "heads": [torch.nonzero(heads[i]).flatten().tolist() for i in layers],
            "kv_heads": [torch.nonzero(groups[i]).flatten().tolist() for i in layers],
            "mlp": [torch.nonzero(z["mlp"][i]).flatten().tolist() for i in layers],
            "hidden": torch.nonzero(z["hidden"]).flatten().tolist(),
        }

    def effective_heads(self, z: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per query head mask [L, H]: the head mask times its KV group's mask (when there is one)."""
        heads = z["head"]
        if "kv_head" in z:
            heads = heads * z["kv_head"].repeat_interleave(self.group, dim=-1)
        return heads

    # ------------------------------------------------------------------ sizes

    def parameters_kept(self, scores: dict[str, torch.Tensor]) -> torch.Tensor:
        """Non-embedding parameters of the model the masks describe, for per-unit keep probabilities.

        With P(z > 0) of every unit (`expected_scores`) this is the expected model size; with
        0/1 masks it is the exact count (`shear.prune.shapes.block_parameters`, biases and norms
        included). A KV head is counted with the probability that at least one of its query
        heads survives.
        """
        hidden = scores["hidden"].sum()
        heads = self.effective_heads(scores)                                        # [L, H]
        group_alive = 1 - (1 - scores["head"]).view(heads.shape[0], -1, self.group).prod(-1)  # [L, K]
        if "kv_head" in scores:
            group_alive = group_alive * scores["kv_head"]
        per_layer = block_parameters(hidden, heads.sum(-1), group_alive.sum(-1), scores["mlp"].sum(-1),
                                     self.source["head_dim"], self.layout)
        return (scores["layer"] * per_layer).sum() + hidden                          # + final RMSNorm


# ----------------------------------------------------------------------------- folding


def _scale_rows(linear, factor: torch.Tensor) -> None:
    """Multiply a Linear layer's output (weight rows and bias) by `factor`."""
    linear.weight.mul_(factor.to(linear.weight).unsqueeze(1))
    if linear.bias is not None:
        linear.bias.mul_(factor.to(linear.bias))


@torch.no_grad()
def fold_masks(model, masks: L0Masks, z: dict[str, torch.Tensor]) -> None:
    """Multiply mask values into the weights so the plain model computes the masked one.

    The masked forward (`shear.prune.sheared.MaskHooks`) scales linear maps only, so folding
    is exact: heads scale o_proj's input columns, MLP neurons down_proj's input columns; the
    hidden mask scales o_proj's and down_proj's outputs (weight rows and biases); the layer
    mask scales what enters the residual stream: those outputs too, or in Gemma 3 the post
    norm that follows them (its (1 + w)). The hidden mask also scales the embedding columns
    (with tied embeddings that one matrix is the LM head too, which is why the masked forward
    scales the final norm's output) or, untied, the embedding and LM head columns.
    """
    hd = masks.source["head_dim"]
    heads = masks.effective_heads(z).repeat_interleave(hd, dim=-1)
    for i, layer in enumerate(model.model.layers):
        inputs = (heads[i], z["mlp"][i])
        for (proj, out), columns in zip(residual_writers(layer), inputs):
            proj.weight.mul_(columns.to(proj.weight).unsqueeze(0))
            if proj is out:
                _scale_rows(proj, z["layer"][i] * z["hidden"])
            else:
                _scale_rows(proj, z["hidden"])
                scale_norm(out, z["layer"][i], masks.layout["unit_offset_norm"])
    emb = model.get_input_embeddings().weight
    emb.mul_(z["hidden"].to(emb))
    head = model.get_output_embeddings()
    if head is not None and head.weight is not emb:
        head.weight.mul_(z["hidden"].to(head.weight))
