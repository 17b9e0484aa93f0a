"""Layer-by-layer scoring: block and width importance of a checkpoint larger than the device.

The whole-model criteria of `shear.importance.blocks` and `.width` hold every weight on the
device. Here the model is a meta-device skeleton (no weights) and each block's tensors are
read from the checkpoint's safetensors files (`safe_open`, that block's keys only) when the
block runs, then released: the device holds one block plus the calibration hidden states.
The embeddings open the pass; the final norm and LM head close it.

One pass over the blocks gives every statistic at once. Perplexity without block i (the
fast path): the stream of candidate i starts as the hidden state entering block i and then
goes through every later block as it is loaded, so each block is read once and applied to
the true state and to every open candidate stream, the same O(L^2) block applications as
`blocks.ppl_scores`, on the same tensors in the same order: the numbers are the
whole-model ones. The maths of each criterion is `blocks`'/`width`'s own (imported).

Supported: ppl, ppl+, bi, angular, sleb, magnitude, random and width activation. The
taylor criteria need a backward pass through the whole model and width magnitude reads
every weight per unit: they need the model to fit (`check_layerwise_criteria`).
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from shear.errors import ShearError
from shear.importance.blocks import (
    angular_distance_sum,
    angular_from_distances,
    block_magnitude,
    block_record,
    cosine_sum,
    random_scores,
    sleb_greedy,
)
from shear.importance.width import _group_sum, activation_scores
from shear.models import check_weights, read_config
from shear.nll import logits_nll

LAYERWISE_BLOCK_CRITERIA = ("ppl", "ppl+", "bi", "angular", "sleb", "magnitude", "random")
LAYERWISE_WIDTH_CRITERIA = ("activation",)


def check_layerwise_criteria(block_criteria: list[str], width_criteria: list[str]) -> None:
    """One line naming the criteria that cannot be scored one block at a time, before any work."""
    bad = [c for c in block_criteria if c not in LAYERWISE_BLOCK_CRITERIA]
    bad += [f"width {c}" for c in width_criteria if c not in LAYERWISE_WIDTH_CRITERIA]
    if bad:
        raise ShearError(
            f"score: {', '.join(bad)} need the whole model on the device (taylor: a full backward pass) and it "
            "does not fit, so scoring is layer by layer; remove them from score.block_criteria / "
            "score.width_criteria, or run on a larger device (python -m shear.plan shows what fits)")


class CheckpointBlocks:
    """A checkpoint's skeleton on the meta device, and its blocks' weights read on demand."""

    def __init__(self, directory: str | Path, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
        from transformers import AutoModelForCausalLM

        self.directory, self.dtype, self.device = Path(directory), dtype, torch.device(device)
        self.config = read_config(self.directory)
        check_weights(self.directory)
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            self.files = {k: self.directory / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        elif (self.directory / "model.safetensors").is_file():
            from safetensors import safe_open

            single = self.directory / "model.safetensors"
            with safe_open(str(single), framework="pt") as f:
                self.files = dict.fromkeys(f.keys(), single)
        else:
            raise ShearError(f"{self.directory}: no model.safetensors or model.safetensors.index.json")
        with torch.device("meta"):
            self.skeleton = AutoModelForCausalLM.from_config(self.config).eval()
        core = self.skeleton.model
        # rotary inverse frequencies are computed, not stored: build them for real
        with torch.device(self.device):
            core.rotary_emb = type(core.rotary_emb)(config=self.config)

    def tokenizer(self):
        """The checkpoint's tokenizer."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.directory)

    @property
    def num_layers(self) -> int:
        """Blocks in the checkpoint."""
        return self.config.num_hidden_layers

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every tensor whose name starts with `prefix` (prefix stripped), in the run's dtype, on the device."""
        from safetensors import safe_open

        keys = [k for k in self.files if k.startswith(prefix)]
        out = {}
        for file in sorted({self.files[k] for k in keys}):
            with safe_open(str(file), framework="pt", device=str(self.device)) as f:
                for k in keys:
                    if self.files[k] == file:
                        out[k[len(prefix):]] = f.get_tensor(k).to(self.dtype)
        return out

    def _loaded(self, module: nn.Module, prefix: str) -> nn.Module:
        """A copy of a meta `module` holding the checkpoint's tensors under `prefix`."""
        module = copy.deepcopy(module)
        module.load_state_dict(self.tensors(prefix), assign=True, strict=True)
        return module.eval()

    def block(self, i: int) -> nn.Module:
        """Block i with its weights (the caller drops it when done)."""
        return self._loaded(self.skeleton.model.layers[i], f"model.layers.{i}.")

    def embeddings(self) -> nn.Module:
        """The input embeddings."""
        return self._loaded(self.skeleton.model.embed_tokens, "model.embed_tokens.")

    def head(self) -> tuple[nn.Module, nn.Module]:
        """(final norm, LM head); a tied head reads the embedding matrix."""
        norm = self._loaded(self.skeleton.model.norm, "model.norm.")
        tied = "lm_head.weight" not in self.files
        head = self._loaded(self.skeleton.lm_head, "model.embed_tokens." if tied else "lm_head.")
        return norm, head

    @contextlib.contextmanager
    def shell(self, embed: nn.Module, layers: list[nn.Module], norm: nn.Module, head: nn.Module):
        """The skeleton with these modules in place: transformers' own forward (masks, rotary) runs them."""
        sk, core = self.skeleton, self.skeleton.model
        saved = core.embed_tokens, core.layers, core.norm, sk.lm_head
        core.embed_tokens, core.layers, core.norm, sk.lm_head = embed, nn.ModuleList(layers), norm, head
        try:
            yield sk
        finally:
            core.embed_tokens, core.layers, core.norm, sk.lm_head = saved

    def run_block(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """`block` applied to the hidden states entering it, as inside the whole model."""
        with self.shell(nn.Identity(), [block], nn.Identity(), nn.Identity()) as sk:
            return sk.model(inputs_embeds=hidden, use_cache=False).last_hidden_state


class _StateLookup(nn.Module):
    """An "embedding" whose token ids index rows of given hidden states: feeds a block its real input."""

    def __init__(self, states: torch.Tensor):
        super().__init__()
        self.states = states

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.states[ids]


@torch.no_grad()
def _block_activation(source: CheckpointBlocks, block: nn.Module, states: torch.Tensor,
                      batch_size: int) -> dict[str, torch.Tensor]:
    """`width.activation_scores` of one block fed its real inputs `states` [N, T, d]: row 0 of each key."""
    N, T, d = states.shape
    index = torch.arange(N * T).view(N, T)
    with source.shell(_StateLookup(states.reshape(N * T, d)), [block], nn.Identity(), nn.Identity()) as sk:
        scores = activation_scores(sk, index, batch_size)
    return {k: scores[k][0] for k in ("heads", "mlp", "hidden_layers", "layers")}


@torch.no_grad()
def _final_norm_activation(source: CheckpointBlocks, norm: nn.Module, states: torch.Tensor,
                           batch_size: int) -> torch.Tensor:
    """The final norm's part of the hidden-channel activation score (no blocks run)."""
    N, T, d = states.shape
    index = torch.arange(N * T).view(N, T)
    with source.shell(_StateLookup(states.reshape(N * T, d)), [], norm, nn.Identity()) as sk:
        return activation_scores(sk, index, batch_size)["hidden"]


@torch.no_grad()
def layerwise_pass(source: CheckpointBlocks, calib: torch.Tensor, batch_size: int, *, removed=(),
                   ppl: bool = True, states: bool = False, magnitude: bool = False,
                   activation: bool = False, progress: bool = True) -> dict:
    """One pass over the blocks that are not `removed`, each read once.

    Returns what was asked: `ppl` (perplexity without each kept block, in kept order, and
    `unpruned_ppl`), `bi_cos` / `angular_last` (block influence sums and last-token states
    for angular), `magnitude`, `activation` (width activation scores as `width_scores`).
    """
    kept = [j for j in range(source.num_layers) if j not in set(removed)]
    embed = source.embeddings()
    batches = [calib[s:s + batch_size].to(source.device) for s in range(0, len(calib), batch_size)]
    h = [embed(ids) for ids in batches]  # the true hidden states, per calibration batch
    del embed
    streams: dict[int, list[torch.Tensor]] = {}  # candidate i: the states without block i
    out: dict = {"kept": kept}
    bi_cos, last, mags, acts = [], [[x[:, -1:] for x in h]], [], []
    for j in tqdm(kept, desc="layer-by-layer", unit="block", disable=not progress):
        block = source.block(j)
        if ppl:
            for i in streams:
                streams[i] = [source.run_block(block, s) for s in streams[i]]
            streams[j] = h  # without block j, the next block receives what block j received
        if magnitude:
            mags.append(block_magnitude(block))
        if activation:
            acts.append(_block_activation(source, block, torch.cat(h), batch_size))
        if ppl or states or activation:  # magnitude alone needs no forward pass
            nxt = [source.run_block(block, x) for x in h]
            if states:
                bi_cos.append(sum(cosine_sum(x, y) for x, y in zip(h, nxt)))
                last.append([y[:, -1:] for y in nxt])
            h = nxt
        del block
    if ppl or activation:
        norm, head = source.head()
        if ppl:
            tokens = calib.shape[0] * (calib.shape[1] - 1)
            nll = lambda xs: sum(logits_nll(head(norm(x)), ids).item() for x, ids in zip(xs, batches))  # noqa: E731
            out["ppl"] = [math.exp(nll(streams[j]) / tokens) for j in kept]
            out["unpruned_ppl"] = math.exp(nll(h) / tokens)
        if activation:
            final = _final_norm_activation(source, norm, torch.cat(h), batch_size)
            heads, mlp, hidden_layers = (torch.stack([a[k] for a in acts]) for k in ("heads", "mlp", "hidden_layers"))
            out["activation"] = {
                "heads": heads, "kv_heads": _group_sum(heads, source.config.num_key_value_heads), "mlp": mlp,
                "hidden": hidden_layers.sum(0) + final, "hidden_layers": hidden_layers,
                "layers": torch.stack([a["layers"] for a in acts])}
    if states:
        out["bi_cos"], out["angular_last"] = bi_cos, last
    if magnitude:
        out["magnitude"] = mags
    return out


def layerwise_block_scores(source: CheckpointBlocks, calib: torch.Tensor, criterion: str, *, n: int,
                           batch_size: int, seed: int = 0, memo: dict | None = None) -> tuple[list[float], dict]:
    """`blocks.block_scores` one block at a time (criteria of LAYERWISE_BLOCK_CRITERIA).

    `memo` shares a pass between criteria: one pass gives ppl, bi, angular and the
    unpruned perplexity.
    """
    check_layerwise_criteria([criterion], [])
    memo = {} if memo is None else memo
    L, base, record = source.num_layers, criterion.rstrip("+"), {}
    if base in ("ppl", "bi", "angular", "sleb") and "pass" not in memo:
        memo["pass"] = layerwise_pass(source, calib, batch_size, states=True)
        memo["ppl"], memo["unpruned_ppl"] = memo["pass"]["ppl"], memo["pass"]["unpruned_ppl"]
    if base == "ppl":
        scores = memo["ppl"]
    elif base == "bi":
        scores = [1 - c / calib.numel() for c in memo["pass"]["bi_cos"]]
    elif base == "angular":
        last = memo["pass"]["angular_last"]
        dist = [sum(angular_distance_sum(a, b) for a, b in zip(last[s], last[s + n])) / calib.shape[0]
                for s in range(L - n + 1)]
        scores, record["span"] = angular_from_distances(dist, L, n)
    elif base == "sleb":
        step = lambda removed: layerwise_pass(source, calib, batch_size, removed=removed)["ppl"]  # noqa: E731
        scores, record["removal_order"] = sleb_greedy(L, n, step, first=memo["ppl"])
    elif base == "magnitude":
        scores = layerwise_pass(source, calib, batch_size, ppl=False, magnitude=True)["magnitude"]
    else:  # random
        scores = random_scores(L, seed)
    return scores, record


def score_blocks_layerwise(source: CheckpointBlocks, calib: torch.Tensor, criterion: str, *, n: int,
                           batch_size: int, keep_first: int = 4, keep_last: int = 2, seed: int = 0,
                           memo: dict | None = None) -> dict:
    """`blocks.score_blocks`, one block at a time: the same record."""
    memo = {} if memo is None else memo
    scores, extras = layerwise_block_scores(source, calib, criterion, n=n, batch_size=batch_size, seed=seed,
                                            memo=memo)
    return block_record(criterion, scores, extras, memo, calib, n=n, keep_first=keep_first, keep_last=keep_last)


def layerwise_width_scores(source: CheckpointBlocks, calib: torch.Tensor, criterion: str,
                           batch_size: int) -> dict[str, torch.Tensor]:
    """`width.width_scores` one block at a time (activation only)."""
    check_layerwise_criteria([], [criterion])
    scores = layerwise_pass(source, calib, batch_size, ppl=False, activation=True)["activation"]
    return {k: v.cpu() for k, v in scores.items()}
