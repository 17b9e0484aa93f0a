"""Width importance: how much each query head, KV group, MLP neuron and hidden channel matters.

Three criteria, higher = more important, per layer:
- `activation` (Minitron, Muralidharan et al. 2024): mean activation magnitude on calibration
  data. A query head: the L2 norm of its attention output (the slice of o_proj's input that
  belongs to it); an MLP neuron: |act_fn(gate) * up| (down_proj's input); a hidden channel:
  |RMSNorm output| at both norms of each layer, summed over the layers and the final norm.
- `taylor` (LLM-Pruner, Ma et al. 2023): first-order Taylor estimate of the loss change when a
  unit is removed, |W * dL/dW| summed over the unit's weights; L is the LM loss on calibration data.
- `magnitude`: the L2 norm of the unit's weights.

Each criterion also scores whole layers (`layers`), used when the target shape has fewer
layers: `activation` uses Minitron's block importance 1 - cos(block input, block output)
(averaged over tokens); `taylor` sums |W * dL/dW| over all the block's weights (Shortened
LLaMA's Taylor block criterion); `magnitude` is the norm of all the block's weights. (A sum
of per-unit activations would not do: activations grow with depth, so it would drop the
first layers, which matter most.)

The weights of a unit: a query head = its q_proj rows (and q bias) and o_proj columns; a KV
group = its query heads plus its k_proj/v_proj rows (and biases); a neuron = its gate/up rows
(and biases) and down column; a hidden channel = that column or row of every matrix touching
the residual stream, its o_proj/down_proj biases, its weight in every hidden-sized RMSNorm, its
embedding column (and lm_head column when untied). The `activation` criterion reads the
hidden channels at the norms that feed attention and the MLP (Gemma 3: input and
pre-feed-forward norms). For `activation` a KV group
scores the sum of its query heads.
"""
from __future__ import annotations

from pathlib import Path

import safetensors
import safetensors.torch
import torch
from tqdm import tqdm

from shear.config import WIDTH_CRITERIA
from shear.errors import ShearError
from shear.io import atomic_file, write_json
from shear.models import block_norms, head_dim, norm_feeding
from shear.plots import pyplot, save_png
from shear.prune.shapes import source_shape
from shear.records import ModelShape, WidthScoreSummary

SCORE_KEYS = ("heads", "kv_heads", "mlp", "hidden", "hidden_layers", "layers")


def _dims(model) -> tuple[int, int, int, int, int, int]:
    c = model.config
    return c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, head_dim(c), c.intermediate_size, c.hidden_size


def _group_sum(heads: torch.Tensor, n_kv: int) -> torch.Tensor:
    """[layers, heads] -> [layers, kv groups]: each group's query heads summed (heads grouped in order)."""
    return heads.view(heads.shape[0], n_kv, -1).sum(-1)


def _batches_with_progress(calib: torch.Tensor, batch_size: int, device, desc: str):
    for start in tqdm(range(0, len(calib), batch_size), desc=desc, unit="batch"):
        yield calib[start:start + batch_size].to(device)


@torch.no_grad()
def activation_scores(model, calib: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    """Minitron activation importance: mean magnitudes over every calibration token."""
    L, nh, nkv, hd, inter, d = _dims(model)
    device = next(model.parameters()).device
    heads = torch.zeros(L, nh, dtype=torch.float64, device=device)
    mlp = torch.zeros(L, inter, dtype=torch.float64, device=device)
    hidden_layers = torch.zeros(L, d, dtype=torch.float64, device=device)
    final = torch.zeros(d, dtype=torch.float64, device=device)
    cosine = torch.zeros(L, dtype=torch.float64, device=device)  # summed over tokens

    def sum_tokens(x):  # [batch, seq, n] -> [n], summed over tokens in float64
        return x.double().reshape(-1, x.shape[-1]).sum(0)

    hooks = []
    for i, layer in enumerate(model.model.layers):
        def head_hook(module, args, i=i):
            x = args[0]
            heads[i] += sum_tokens(x.float().reshape(*x.shape[:-1], nh, hd).norm(dim=-1))

        def mlp_hook(module, args, i=i):
            mlp[i] += sum_tokens(args[0].abs())

        def norm_hook(module, args, out, i=i):
            hidden_layers[i] += sum_tokens(out.abs())

        def block_hook(module, args, kwargs, out, i=i):
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, tuple) else out
            cosine[i] += torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1).sum()

        hooks += [layer.register_forward_hook(block_hook, with_kwargs=True),
                  layer.self_attn.o_proj.register_forward_pre_hook(head_hook),
                  layer.mlp.down_proj.register_forward_pre_hook(mlp_hook),
                  *(norm.register_forward_hook(norm_hook) for norm in norm_feeding(layer))]

    def final_hook(module, args, out):
        final.add_(sum_tokens(out.abs()))

    hooks.append(model.model.norm.register_forward_hook(final_hook))
    was_training = model.training
    model.eval()
    try:
        for batch in _batches_with_progress(calib, batch_size, device, "activation scores"):
            model(input_ids=batch, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    tokens = calib.numel()
    heads, mlp, hidden_layers, final, cosine = (t.cpu() / tokens for t in (heads, mlp, hidden_layers, final, cosine))
    return {"heads": heads, "kv_heads": _group_sum(heads, nkv), "mlp": mlp,
            "hidden": hidden_layers.sum(0) + final, "hidden_layers": hidden_layers, "layers": 1 - cosine}


def _weight_unit_sums(model, value) -> dict[str, torch.Tensor]:
    """Sum `value(parameter)` (same shape as the weight) over the weights of every unit."""
    L, nh, nkv, hd, inter, d = _dims(model)
    heads = torch.zeros(L, nh, dtype=torch.float64)
    kv_own = torch.zeros(L, nkv, dtype=torch.float64)
    mlp = torch.zeros(L, inter, dtype=torch.float64)
    hidden_layers = torch.zeros(L, d, dtype=torch.float64)
    layers = torch.zeros(L, dtype=torch.float64)

    def bias(linear):  # a unit's bias entries belong to it (zeros where the family has none)
        if linear.bias is None:
            return torch.zeros(linear.out_features, dtype=torch.float64)
        return value(linear.bias)

    for i, layer in enumerate(model.model.layers):
        layers[i] = sum(value(p).sum() for p in layer.parameters())
        attn, m = layer.self_attn, layer.mlp
        q, o = value(attn.q_proj.weight), value(attn.o_proj.weight)  # [nh*hd, d], [d, nh*hd]
        heads[i] = q.view(nh, hd, d).sum((1, 2)) + o.view(d, nh, hd).sum((0, 2)) \
            + bias(attn.q_proj).view(nh, hd).sum(1)
        for proj in (attn.k_proj, attn.v_proj):
            v = value(proj.weight)
            kv_own[i] += v.view(nkv, hd, d).sum((1, 2)) + bias(proj).view(nkv, hd).sum(1)
            hidden_layers[i] += v.sum(0)
        gate, up, down = value(m.gate_proj.weight), value(m.up_proj.weight), value(m.down_proj.weight)
        mlp[i] = gate.sum(1) + up.sum(1) + down.sum(0) + bias(m.gate_proj) + bias(m.up_proj)
        hidden_layers[i] += q.sum(0) + o.sum(1) + gate.sum(0) + up.sum(0) + down.sum(1)
        hidden_layers[i] += bias(attn.o_proj) + bias(m.down_proj) + sum(value(n.weight) for n in block_norms(layer))
    outside = value(model.get_input_embeddings().weight).sum(0) + value(model.model.norm.weight)
    head = model.get_output_embeddings()
    if head is not None and head.weight is not model.get_input_embeddings().weight:
        outside += value(head.weight).sum(0)
    return {"heads": heads, "kv_heads": _group_sum(heads, nkv) + kv_own, "mlp": mlp,
            "hidden": hidden_layers.sum(0) + outside, "hidden_layers": hidden_layers, "layers": layers}


@torch.no_grad()
def width_magnitude_scores(model) -> dict[str, torch.Tensor]:
    """L2 norm of each unit's weights."""
    sums = _weight_unit_sums(model, lambda p: p.detach().double().pow(2).cpu())
    return {k: v.sqrt() for k, v in sums.items()}


def width_taylor_scores(model, calib: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    """LLM-Pruner first-order importance: sum over a unit's weights of |W * dL/dW|."""
    device = next(model.parameters()).device
    was_training = model.training
    requires = {p: p.requires_grad for p in model.parameters()}
    model.eval()
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        for batch in _batches_with_progress(calib, batch_size, device, "taylor scores"):
            # mean loss over all calibration sequences: each batch weighs by its share
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss * (len(batch) / len(calib))
            loss.backward()
        with torch.no_grad():
            return _weight_unit_sums(model, lambda p: (p.detach() * p.grad).double().abs().cpu())
    finally:
        model.zero_grad(set_to_none=True)
        for p, flag in requires.items():
            p.requires_grad_(flag)
        model.train(was_training)


def width_scores(model, calib: torch.Tensor, criterion: str, batch_size: int) -> dict[str, torch.Tensor]:
    """Scores of one criterion: {"heads": [L, nh], "kv_heads": [L, nkv], "mlp": [L, I],
    "hidden": [d] (the whole model), "hidden_layers": [L, d] (each layer's part), "layers": [L]}."""
    if criterion == "activation":
        return activation_scores(model, calib, batch_size)
    if criterion == "taylor":
        return width_taylor_scores(model, calib, batch_size)
    if criterion == "magnitude":
        return width_magnitude_scores(model)
    raise ShearError(f"params.yaml: score.width_criteria has unknown criterion {criterion!r}; "
                     f"valid: {', '.join(WIDTH_CRITERIA)}")


def write_width_scores(model, calib: torch.Tensor, criterion: str, summary_dir: Path, tensor_dir: Path,
                       batch_size: int, scores: dict[str, torch.Tensor] | None = None) -> Path:
    """Score `model` (unless `scores` come computed, e.g. layer by layer); write the tensors to `<tensor_dir>/width_<criterion>.safetensors` (float64, a
    DVC-cached output) and a small summary `<summary_dir>/width_<criterion>.json` with a heatmap
    `width_<criterion>.png` beside it (kept in git). Returns the tensor file's path."""
    scores = width_scores(model, calib, criterion, batch_size) if scores is None else scores
    tensor_path = Path(tensor_dir) / f"width_{criterion}.safetensors"
    tensors = {k: scores[k].double().contiguous() for k in SCORE_KEYS}
    with atomic_file(tensor_path, "wb") as f:
        f.write(safetensors.torch.save(tensors, metadata={"criterion": criterion}))
    summary = WidthScoreSummary(
        criterion=criterion, shape=ModelShape(**source_shape(model.config)),
        calibration=None if criterion == "magnitude" else {"sequences": int(calib.shape[0]),
                                                           "seq_len": int(calib.shape[1])},
        tensors={k: list(t.shape) for k, t in tensors.items()}, file=tensor_path.name)
    write_json(Path(summary_dir) / f"width_{criterion}.json", summary.to_dict())
    plot_width_scores(scores, criterion, Path(summary_dir) / f"width_{criterion}.png")
    return tensor_path


def read_width_scores(path: str | Path) -> dict[str, torch.Tensor]:
    """The score tensors of a `width_<criterion>.safetensors` (keys as in `width_scores`)."""
    path = Path(path)
    if not path.is_file():
        raise ShearError(f"{path}: not found; run the score stage (dvc repro score)")
    try:
        tensors = safetensors.torch.load_file(path)
    except (safetensors.SafetensorError, OSError) as e:
        raise ShearError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]}); "
                         "re-run the score stage") from None
    missing = [k for k in SCORE_KEYS if k not in tensors]
    if missing:
        raise ShearError(f"{path}: not a width scores file (no {missing[0]!r}); re-run the score stage")
    return {k: tensors[k] for k in SCORE_KEYS}


def plot_width_scores(scores: dict[str, torch.Tensor], criterion: str, path: Path) -> None:
    """Heatmaps (layer x unit) of head, MLP neuron and hidden channel scores, each row scaled to
    its max, and the layer scores as bars."""
    panels = [("query heads", scores["heads"]), ("MLP neurons", scores["mlp"]),
              ("hidden channels (per layer)", scores["hidden_layers"])]
    fig, axes = pyplot().subplots(1, 4, figsize=(18, 4.5), gridspec_kw={"width_ratios": [3, 3, 3, 1]})
    for ax, (title, s) in zip(axes, panels):
        rows = s / s.abs().amax(1, keepdim=True).clamp_min(1e-30)  # compare units within a layer
        im = ax.imshow(rows.numpy(), aspect="auto", interpolation="nearest", cmap="viridis")
        ax.set_title(title)
        ax.set_xlabel("unit")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, fraction=0.046)
    layers = scores["layers"].numpy()
    axes[3].barh(range(len(layers)), layers)
    axes[3].set_ylim(len(layers) - 0.5, -0.5)  # layer 0 on top, as in the heatmaps
    axes[3].set_title("layers")
    axes[3].set_xlabel("score")
    fig.suptitle(f"width importance: {criterion} (row-normalised)")
    fig.tight_layout()
    save_png(fig, path, dpi=90)
