"""Target shapes for width pruning: parameter counts, validity rules, and a budget planner.

A shape is a plain dict with the keys of `SHAPE_KEYS` (a LLaMA config's size fields, with
an explicit `head_dim`). Width pruning never changes `head_dim`: it removes whole heads.

Validity (what transformers can build and what GQA slicing can produce):
- every dimension between 1 and the source's;
- `head_dim` equal to the source's;
- query heads grouped per KV head as in the source: keep `num_key_value_heads` of the
  source's KV groups (prune whole groups) with the same number of query heads in each
  (prune query heads evenly), so `num_attention_heads = kv_heads * q_per_group` with
  `q_per_group <= ` the source's group size;
- `hidden_size % num_attention_heads == 0` (transformers checks it even when head_dim is
  explicit).

The planner turns a non-embedding parameter budget into a shape that keeps the source's
aspect ratios: layers, hidden size, heads, KV heads and MLP width all shrink by about the
same factor. A budget alone does not give Sheared-LLaMA's shapes: the paper's 1.3B
(24 layers / 2048 / 16 heads / 5504) and 2.7B (32 / 2560 / 20 / 6912) targets cut from
LLaMA-2-7B (32 / 4096 / 32 / 11008) were chosen by hand and keep more depth than width
(3/4 of the layers at 1/2 of the width; every layer at 5/8 of it), so for the 1.3B
budget the planner picks 19 / 2304 / 18 / 6144 (tp_divisible 1). Hold the paper's depth
fixed alongside the budget (`params` with `num_hidden_layers: 24`, or
`num_hidden_layers: 32` with `tp_divisible` at most 4, as 20 heads do not split over 8
devices) and the planner, shrinking the width dimensions alike, gives both paper shapes
exactly (tests/test_shapes.py checks it).
"""
from __future__ import annotations

import math

from shear.errors import ShearError
from shear.models import PLAIN_LAYOUT, TP_DEGREES, tensor_parallel
from shear.models import head_dim as config_head_dim
from shear.models import layout as config_layout

SHAPE_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "head_dim")
# The keys a user sets (head_dim always stays the source's).
TARGET_KEYS = SHAPE_KEYS[:-1]

# The planner accepts a shape whose count is within this fraction below the budget; it
# relaxes the alignment before it accepts a worse fit.
PLAN_TOLERANCE = 0.03


def source_shape(config) -> dict:
    """The shape of a model config (head_dim made explicit)."""
    shape = {k: int(getattr(config, k)) for k in TARGET_KEYS}
    shape["head_dim"] = int(config_head_dim(config))
    return shape


def block_parameters(hidden, heads, kv_heads, mlp, head_dim: int, layout: dict):
    """Parameters of one transformer block: the one count formula of the project.

    Weights: q and o (h*nh*hd each), k and v (h*nkv*hd each), gate/up/down (h*i each); the
    block's RMSNorms (h each, 2 or Gemma's 4); q_norm/k_norm (hd each, Qwen3 and Gemma 3);
    biases where the family has them (q: nh*hd, k and v: nkv*hd each, o: h, gate/up: i each,
    down: h). Works on ints, floats (the planner's fractional shapes) and tensors (the L0 masks'
    expected sizes, where each argument is an expected count of kept units).
    """
    n = hidden * (2 * head_dim * (heads + kv_heads) + 3 * mlp + layout["norms_per_block"])
    if layout["qkv_bias"]:
        n = n + head_dim * (heads + 2 * kv_heads)
    if layout["o_bias"]:
        n = n + hidden
    if layout["mlp_bias"]:
        n = n + 2 * mlp + hidden
    if layout["qk_norm"]:
        n = n + 2 * head_dim
    return n


def shape_parameters(shape: dict, vocab_size: int, tied: bool, layout: dict = PLAIN_LAYOUT) -> dict:
    """Total and non-embedding parameter counts of a model of this shape and block layout.

    Every block (`block_parameters`) plus the final RMSNorm (h) are the non-embedding
    parameters; embeddings (v*h) and an untied lm_head (v*h) the embedding ones. Equal to
    `shear.models.count_parameters` of the built model (tests check it per family).
    """
    h = shape["hidden_size"]
    per_block = block_parameters(h, shape["num_attention_heads"], shape["num_key_value_heads"],
                                 shape["intermediate_size"], shape["head_dim"], layout)
    non_embedding = shape["num_hidden_layers"] * per_block + h
    embedding = vocab_size * h * (1 if tied else 2)
    return {"total": non_embedding + embedding, "non_embedding": non_embedding}


def _non_embedding(shape: dict, layout: dict) -> int:
    return shape_parameters(shape, 0, True, layout)["non_embedding"]


def format_shape(shape: dict) -> str:
    """`num_hidden_layers=24, hidden_size=384, ...` (the user-settable keys)."""
    return ", ".join(f"{k}={shape[k]}" for k in TARGET_KEYS)


# ----------------------------------------------------------------------------- validity


def _problem(src: dict, shape: dict) -> str | None:
    """The first rule `shape` breaks, as `key=value <why>`, or None when it is valid."""
    for k in SHAPE_KEYS:
        v = shape[k]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            return f"{k}={v!r} must be a positive integer"
    if shape["head_dim"] != src["head_dim"]:
        return (f"head_dim={shape['head_dim']} must stay the source's {src['head_dim']} "
                "(width pruning removes whole heads)")
    for k in TARGET_KEYS:
        if shape[k] > src[k]:
            return f"{k}={shape[k]} exceeds the source's {src[k]}"
    nh, nkv = shape["num_attention_heads"], shape["num_key_value_heads"]
    group = src["num_attention_heads"] // src["num_key_value_heads"]
    if nh % nkv:
        return f"num_attention_heads={nh} is not a multiple of num_key_value_heads={nkv}"
    if nh // nkv > group:
        return (f"num_attention_heads={nh} needs {nh // nkv} query heads per KV group, but the source's groups "
                f"have {group} (keep at most {nkv * group} heads with {nkv} KV heads)")
    if shape["hidden_size"] % nh:
        return f"hidden_size={shape['hidden_size']} is not divisible by num_attention_heads={nh}"
    return None


def head_configs(src: dict) -> list[tuple[int, int]]:
    """Every valid (num_attention_heads, num_key_value_heads): kv groups kept x query heads kept per group."""
    group = src["num_attention_heads"] // src["num_key_value_heads"]
    return sorted({(kv * q, kv) for kv in range(1, src["num_key_value_heads"] + 1) for q in range(1, group + 1)})


def _distance(a: dict, b: dict) -> float:
    """How far two shapes are apart: summed |log ratio| over the user-settable keys."""
    return sum(abs(math.log(a[k] / b[k])) for k in TARGET_KEYS)


def nearest_valid_shapes(src: dict, shape: dict, n: int = 3) -> list[dict]:
    """Up to `n` valid shapes closest to `shape`: dims clamped to the source's, each valid head
    configuration, hidden_size rounded down and up to a multiple of the heads."""
    clamped = {k: min(max(int(shape[k]), 1), src[k]) if k in TARGET_KEYS else src[k] for k in SHAPE_KEYS}
    found = {}
    for nh, nkv in head_configs(src):
        h = clamped["hidden_size"]
        for hidden in {max(nh, h // nh * nh), -(-h // nh) * nh}:
            cand = {**clamped, "num_attention_heads": nh, "num_key_value_heads": nkv, "hidden_size": hidden}
            if _problem(src, cand) is None:
                found[tuple(cand.values())] = cand
    return sorted(found.values(), key=lambda c: (_distance(c, clamped), format_shape(c)))[:n]


def validate_shape(source_config, shape: dict) -> None:
    """Raise ShearError naming the offending `prune.target` key and the nearest valid shapes."""
    src = source_config if isinstance(source_config, dict) else source_shape(source_config)
    unknown = sorted(set(shape) - set(SHAPE_KEYS))
    if unknown:
        raise ShearError(f"prune.target: unknown key {unknown[0]}; valid keys: params, {', '.join(TARGET_KEYS)}")
    full = {**src, **shape}
    problem = _problem(src, full)
    if problem is None:
        return
    numeric = all(isinstance(full[k], int) and full[k] >= 1 for k in SHAPE_KEYS)
    near = nearest_valid_shapes(src, full) if numeric else []
    hint = "; nearest valid shapes: " + " | ".join(f"({format_shape(s)})" for s in near) if near else ""
    raise ShearError(f"prune.target.{problem}{hint}")


# ----------------------------------------------------------------------------- planner


def _alignments(align: int) -> list[int]:
    """align, align/2, ..., 1: the planner relaxes the alignment only when it must."""
    out = [max(1, align)]
    while out[-1] > 1:
        out.append(out[-1] // 2)
    return out


def _aspect_deviation(shape: dict, src: dict, free: list[str]) -> float:
    """How unevenly the free dimensions shrank: the spread (sum of squared deviations from
    their mean) of log(new / source) over the free dimensions; 0 when all shrank alike."""
    logs = [math.log(shape[k] / src[k]) for k in free]
    mean = sum(logs) / len(logs) if logs else 0.0
    return sum((x - mean) ** 2 for x in logs)


def _ideal_scale(src: dict, budget: int, fixed: dict, layout: dict) -> float:
    """The factor s in (0, 1] such that scaling every free dimension by s (fractional
    dimensions allowed) meets the budget exactly; found by bisection."""
    def params(s: float) -> float:
        d = {k: fixed.get(k, src[k] * s) for k in TARGET_KEYS}
        return _non_embedding({**d, "head_dim": src["head_dim"]}, layout)

    lo, hi = 1e-6, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if params(mid) <= budget else (lo, mid)
    return lo


def _candidates(src: dict, budget: int, s: float, align: int, fixed: dict, layout: dict, tp: int):
    """Valid shapes near the ideal scaled shape, with hidden and MLP sizes multiples of `align`
    (the MLP filling what the budget leaves) that split over `tp` devices; yields shapes at or
    under the budget."""
    hd = src["head_dim"]
    if "num_hidden_layers" in fixed:
        layer_options = [fixed["num_hidden_layers"]]
    else:
        ideal = src["num_hidden_layers"] * s
        layer_options = range(max(1, math.floor(ideal) - 2), min(src["num_hidden_layers"], math.ceil(ideal) + 2) + 1)
    heads = [(nh, nkv) for nh, nkv in head_configs(src)
             if fixed.get("num_attention_heads", nh) == nh and fixed.get("num_key_value_heads", nkv) == nkv
             and nh % tp == 0 and (nkv % tp == 0 or tp % nkv == 0)]
    mlp_step = math.lcm(align, tp)
    ideal_h = src["hidden_size"] * s
    for nh, nkv in heads:
        if "hidden_size" in fixed:
            hiddens = [fixed["hidden_size"]] if fixed["hidden_size"] % nh == 0 else []
        else:
            step = math.lcm(align, nh)
            lo = max(step, math.floor(ideal_h * 0.75 / step) * step)
            hi = min(src["hidden_size"] // step * step, math.ceil(ideal_h * 1.25 / step) * step)
            hiddens = range(lo, hi + 1, step)
        for h in hiddens:
            for layers in layer_options:
                if "intermediate_size" in fixed:
                    mlp = fixed["intermediate_size"]
                else:  # the largest MLP the budget allows (a block's count is linear in it)
                    attn = block_parameters(h, nh, nkv, 0, hd, layout)
                    per_neuron = block_parameters(h, nh, nkv, 1, hd, layout) - attn
                    room = ((budget - h) // layers - attn) // per_neuron
                    mlp = min(room, src["intermediate_size"]) // mlp_step * mlp_step
                    if mlp < 1:
                        continue
                shape = {"num_hidden_layers": layers, "hidden_size": h, "num_attention_heads": nh,
                         "num_key_value_heads": nkv, "intermediate_size": mlp, "head_dim": hd}
                if (_non_embedding(shape, layout) <= budget and _problem(src, shape) is None
                        and tensor_parallel(shape, tp) == tp):
                    yield shape


def plan_shape(src: dict, budget: int, align: int = 1, fixed: dict | None = None,
               layout: dict = PLAIN_LAYOUT, tp_divisible: int = 1) -> dict:
    """The valid shape closest to the source's aspect ratios whose non-embedding count is at
    most `budget` and, when possible, within PLAN_TOLERANCE of it.

    With `tp_divisible` = t > 1 the planner first looks for shapes that split evenly over t
    devices (`tensor_parallel`: heads, KV heads and MLP neurons divisible), then t/2, ..., 1:
    a 23-head model fits a budget but no 2-, 4- or 8-GPU tensor-parallel server.
    With `align > 1` the hidden and MLP sizes are multiples of `align` where that still fits
    the budget within the tolerance: GPU matmul kernels work in tiles (e.g. 64 or 128 wide),
    so a dimension that is not a multiple of the tile pads the last tile with wasted work and
    can make a smaller model run slower than a larger aligned one. The planner then halves the
    alignment (align/2, ..., 1) until a shape fits. Keys in `fixed` are held at their values
    (fixing `num_hidden_layers` at the paper's depth gives Sheared-LLaMA's shapes; see above).
    """
    fixed = dict(fixed or {})
    free = [k for k in TARGET_KEYS if k not in fixed]
    s = _ideal_scale(src, budget, fixed, layout)
    best = None
    for tp in _alignments(tp_divisible):
        for a in _alignments(align):
            shapes = list(_candidates(src, budget, s, a, fixed, layout, tp))
            if not shapes:
                continue
            close = [c for c in shapes if _non_embedding(c, layout) >= (1 - PLAN_TOLERANCE) * budget]
            if close:  # as even as possible, then the fullest, then a fixed order for reproducibility
                return min(close, key=lambda c: (round(_aspect_deviation(c, src, free), 9),
                                                 -_non_embedding(c, layout), format_shape(c)))
            fullest = max(shapes, key=lambda c: (_non_embedding(c, layout), -_aspect_deviation(c, src, free)))
            if best is None or _non_embedding(fullest, layout) > _non_embedding(best, layout):
                best = fullest
    return best


def _check_fixed(src: dict, fixed: dict) -> list[tuple[int, int]]:
    """Dimensions given alongside a budget must each be possible (the planner picks the rest);
    returns the (heads, kv heads) configurations they allow."""
    if fixed.get("head_dim", src["head_dim"]) != src["head_dim"]:
        validate_shape(src, {"head_dim": fixed["head_dim"]})
    for k, v in fixed.items():
        if k in TARGET_KEYS and v > src[k]:
            raise ShearError(f"prune.target.{k}={v} exceeds the source's {src[k]}; valid: 1..{src[k]}")
    nh, nkv = fixed.get("num_attention_heads"), fixed.get("num_key_value_heads")
    options = [(h, kv) for h, kv in head_configs(src) if nh in (None, h) and nkv in (None, kv)]
    if not options:
        valid = sorted({h for h, kv in head_configs(src) if nkv in (None, kv)})
        key, value = ("num_attention_heads", nh) if nh is not None else ("num_key_value_heads", nkv)
        raise ShearError(f"prune.target.{key}={value} is not a valid GQA head count for this source "
                         f"(groups of {src['num_attention_heads'] // src['num_key_value_heads']} query heads); "
                         f"valid num_attention_heads{' with num_key_value_heads=' + str(nkv) if nkv else ''}: "
                         f"{', '.join(map(str, valid))}")
    return options


def resolve_target(config, target: dict, align: int, tp_divisible: int = 8) -> dict:
    """`prune.target` (without `align` and `tp_divisible`) -> a valid shape.

    Either an explicit shape (keys left out or null keep the source's), or `params`, a
    non-embedding parameter budget (counted with the source's biases and norms), for which
    `plan_shape` picks the shape (explicit keys given alongside `params` are held fixed,
    head counts splitting over `tp_divisible` devices preferred). Raises ShearError naming the
    key and the nearest valid shapes when the target is impossible or larger than the source.
    """
    src, layout = source_shape(config), config_layout(config)
    if tp_divisible not in TP_DEGREES:
        raise ShearError(f"prune.target.tp_divisible={tp_divisible!r} is not valid; "
                         f"valid: {', '.join(map(str, sorted(TP_DEGREES)))} (1 = no preference)")
    given = {k: v for k, v in target.items() if v is not None and k not in ("align", "tp_divisible")}
    unknown = sorted(set(given) - {"params", *SHAPE_KEYS})
    if unknown:
        raise ShearError(f"prune.target: unknown key {unknown[0]}; valid keys: params, {', '.join(TARGET_KEYS)}")
    budget = given.pop("params", None)
    source_count = _non_embedding(src, layout)
    if budget is None:
        if not given:
            raise ShearError(
                f"prune.target: give params (a non-embedding parameter budget below the source's "
                f"{source_count:,}) or at least one of {', '.join(TARGET_KEYS)}")
        shape = {**src, **given}
        validate_shape(src, shape)
        return shape

    if budget > source_count:
        raise ShearError(f"prune.target.params={budget:,} exceeds the source's {source_count:,} "
                         f"non-embedding parameters; valid: 1..{source_count:,}")
    nh, nkv = _check_fixed(src, given)[0]
    shape = plan_shape(src, budget, align, given, layout, tp_divisible)
    if shape is None:
        smallest = {"num_hidden_layers": 1, "hidden_size": nh, "num_attention_heads": nh,
                    "num_key_value_heads": nkv, "intermediate_size": 1, "head_dim": src["head_dim"], **given}
        raise ShearError(f"prune.target.params={budget:,} is too small for any valid shape"
                         f"{' with ' + ', '.join(f'{k}={v}' for k, v in given.items()) if given else ''}; "
                         f"the smallest ({format_shape(smallest)}) has {_non_embedding(smallest, layout):,}")
    return shape
