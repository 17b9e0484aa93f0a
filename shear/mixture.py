"""Domain mixture: draw training batches from per-domain shards by mixture weights.

Used by sheared pruning and by retraining. `DomainSampler` keeps its weights fixed;
`DynamicDomainSampler` is Sheared-LLaMA's dynamic batch loading (Xia et al. 2023,
Algorithm 1): every few steps the training loop measures each domain's held-out loss and
moves weight towards the domains whose loss is furthest above a reference loss (by
default the base model's own per-domain loss, so the pruned model is pushed to recover
what it lost, domain by domain).

The training loop's contract, every `mixture.update_every` optimizer steps when dynamic:

    losses = domain_losses(model, rows)         # rows = heldout_rows(...), made once
    sampler.update(losses)
    log_mixture(live, sampler, losses, step)

and `sampler.state_dict()` goes into every checkpoint: it holds the weights, the update
history, the RNG and the per-domain cursors, so a resumed run draws exactly the batches
the uninterrupted run would have.

The current loss and the reference are measured the same way, so that an unchanged model
has no excess loss (Δ = 0, exactly): `heldout_rows` takes the rows the evaluate stage scores
at 128 tokens (its first `evaluate.ppl_max_tokens` tokens of each eval split, BOS in front
when the tokenizer adds one, the same rows per forward pass) and `domain_losses` scores them
with the evaluate stage's own `perplexity` (shear.evaluate, shear.nll), without the training
run's mixed-precision autocast.

A retraining with a dynamic mixture after sheared pruning continues from the pruning run's
final weights (`continued_weights`), as Sheared-LLaMA's continued pre-training does.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from shear.config import HELDOUT_SEQ_LEN
from shear.data import load_domains, rechunk
from shear.errors import ShearError
from shear.evaluate import perplexity, ppl_rows, ppl_rows_per_pass, tokenizer_adds_bos
from shear.io import read_json
from shear.plots import pyplot, save_png
from shear.records import EvalMetrics, MixtureRecord


def initial_weights(domains: dict[str, np.ndarray], given: Optional[dict[str, float]] = None) -> dict[str, float]:
    """Normalised weights: `given` (every domain named, unknown names refused) or proportional to size."""
    if given:
        unknown = sorted(set(given) - set(domains))
        if unknown:
            raise ShearError(
                f"params.yaml: data.domain_weights names unknown domain {unknown[0]!r}; domains: {', '.join(domains)}"
            )
        raw = {d: float(given.get(d, 0.0)) for d in domains}
    else:
        raw = {d: float(np.asarray(a).size) for d, a in domains.items()}
    total = sum(raw.values())
    if total <= 0:
        raise ShearError("params.yaml: data.domain_weights sum to zero over the domains that have training data")
    return {d: w / total for d, w in raw.items()}


class DomainSampler:
    """Draw [batch, seq_len] token batches; each row's domain is drawn by the current weights."""

    def __init__(self, domains: dict[str, np.ndarray], seq_len: int, seed: int,
                 weights: Optional[dict[str, float]] = None):
        self.rows = {d: rechunk(a, seq_len) for d, a in domains.items()}
        self.rows = {d: r for d, r in self.rows.items() if len(r) > 0}
        if not self.rows:
            raise ShearError(f"the training shards hold less than one sequence of {seq_len} tokens in every domain; "
                             "lower the seq_len or add text")
        self.domains = list(self.rows)
        self.seq_len = seq_len
        self.weights = initial_weights(self.rows, weights)
        self.rng = np.random.default_rng(seed)
        self.order = {d: self.rng.permutation(len(r)) for d, r in self.rows.items()}
        self.cursor = {d: 0 for d in self.rows}

    def _next_row(self, domain: str) -> np.ndarray:
        # Walk a shuffled order of the domain's rows; reshuffle when it is used up (an epoch).
        if self.cursor[domain] >= len(self.order[domain]):
            self.order[domain] = self.rng.permutation(len(self.rows[domain]))
            self.cursor[domain] = 0
        row = self.rows[domain][self.order[domain][self.cursor[domain]]]
        self.cursor[domain] += 1
        return row

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, list[str]]:
        """A LongTensor [batch_size, seq_len] and the domain of each row."""
        p = np.array([self.weights[d] for d in self.domains])
        picks = self.rng.choice(len(self.domains), size=batch_size, p=p / p.sum())
        names = [self.domains[i] for i in picks]
        batch = np.stack([self._next_row(d) for d in names]).astype(np.int64)
        return torch.from_numpy(batch), names

    def state_dict(self) -> dict:
        """Everything needed to continue the exact sequence of batches."""
        return {
            "weights": dict(self.weights),
            "rng": self.rng.bit_generator.state,
            "order": {d: o.tolist() for d, o in self.order.items()},
            "cursor": dict(self.cursor),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a state written by `state_dict`."""
        if sorted(state["weights"]) != sorted(self.domains):
            raise ShearError(f"checkpoint sampler has domains {sorted(state['weights'])}, but the shards have "
                             f"{sorted(self.domains)}; resume with the same shards or start afresh")
        self.weights = dict(state["weights"])
        self.rng.bit_generator.state = state["rng"]
        self.order = {d: np.asarray(o) for d, o in state["order"].items()}
        self.cursor = dict(state["cursor"])


class DynamicDomainSampler(DomainSampler):
    """Sheared-LLaMA dynamic batch loading: weights follow each domain's excess loss."""

    def __init__(self, domains: dict[str, np.ndarray], seq_len: int, seed: int,
                 weights: Optional[dict[str, float]] = None, *, reference: dict[str, float],
                 eta: float = 1.0, smoothing: float = 1e-4):
        super().__init__(domains, seq_len, seed, weights)
        missing = [d for d in self.domains if d not in reference]
        if missing:
            raise ShearError(f"no reference loss for domain {missing[0]!r}; give mixture.reference_loss.{missing[0]} "
                             "or evaluate the base model first")
        self.reference = {d: float(reference[d]) for d in self.domains}
        self.eta = eta
        self.smoothing = smoothing
        self.initial_weights = dict(self.weights)  # step 0 of the weight trajectory
        self.history: list[dict] = []

    def update(self, losses: dict[str, float]) -> dict[str, float]:
        """One step of Algorithm 1: the new weights from each domain's current held-out loss."""
        missing = [d for d in self.domains if d not in losses]
        if missing:
            raise ShearError(f"dynamic mixture update got no held-out loss for domain {missing[0]!r}")
        loss = np.array([float(losses[d]) for d in self.domains])
        ref = np.array([self.reference[d] for d in self.domains])
        w = np.array([self.weights[d] for d in self.domains])
        excess = np.maximum(loss - ref, 0.0)  # a domain at or below its reference gets no push
        with np.errstate(divide="ignore"):  # an initial weight of 0 is log 0 = -inf: fine for softmax
            logits = np.log(w) + self.eta * excess
        w = np.exp(logits - logits.max())
        w /= w.sum()
        # Smoothing keeps every domain drawable (>= c/k), so its loss can still be measured and recover.
        k = len(self.domains)
        w = (1 - self.smoothing) * w + self.smoothing / k
        self.weights = {d: float(x) for d, x in zip(self.domains, w)}
        self.history.append({"weights": dict(self.weights), "losses": {d: float(losses[d]) for d in self.domains}})
        return dict(self.weights)

    def state_dict(self) -> dict:
        """Weights, RNG, cursors and the update history."""
        return {**super().state_dict(), "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state written by `state_dict`."""
        super().load_state_dict(state)
        self.history = [dict(h) for h in state.get("history", [])]


def build_sampler(mixture: str, domains: dict[str, np.ndarray], seq_len: int, seed: int,
                  weights: Optional[dict[str, float]] = None, reference: Optional[dict[str, float]] = None,
                  eta: float = 1.0, smoothing: float = 1e-4) -> DomainSampler:
    """The sampler `data.mixture` asks for: `fixed` weights or `dynamic` batch loading."""
    if mixture == "fixed":
        return DomainSampler(domains, seq_len, seed, weights)
    if mixture == "dynamic":
        return DynamicDomainSampler(domains, seq_len, seed, weights, reference=reference or {},
                                    eta=eta, smoothing=smoothing)
    raise ShearError(f"params.yaml: data.mixture={mixture!r} is not known; valid: fixed, dynamic")


class HeldoutRows(dict):
    """{domain: LongTensor [rows, tokens]} of held-out rows (BOS already in front when the protocol
    prepends one) and `rows_per_pass`: how many rows one forward pass scores, which the float
    sums depend on."""

    def __init__(self, rows: dict[str, torch.Tensor], rows_per_pass: int):
        super().__init__(rows)
        self.rows_per_pass = rows_per_pass


def heldout_rows(shards_dir: str | Path, tokenizer, n_sequences: Optional[int] = None,
                 seq_len: int = HELDOUT_SEQ_LEN, *, max_tokens: Optional[int] = None,
                 seq_lens: Optional[list[int]] = None, batch_size: int = 8,
                 max_positions: Optional[int] = None) -> HeldoutRows:
    """The rows of `seq_len` tokens of each domain's eval split that the evaluate stage scores, or
    their first `n_sequences` (None: all of them).

    max_tokens, seq_lens, batch_size: the evaluate stage's protocol (evaluate.ppl_max_tokens,
    ppl_seq_lens, batch_size; max_tokens None: the whole split), max_positions: the model's
    max_position_embeddings. With all of them and `n_sequences` None, `domain_losses` of these
    rows equals the evaluate stage's `loss.<seq_len>` of the same model exactly: the same rows,
    BOS rule (shear.evaluate.tokenizer_adds_bos), scored targets and rows per forward pass.
    """
    bos = tokenizer_adds_bos(tokenizer)
    seq_lens = list(seq_lens or [seq_len])
    max_positions = max_positions or max(seq_lens)
    length = min(seq_len, max_positions - int(bos))  # the evaluate stage's clamp
    rows = {}
    for domain, arr in load_domains(shards_dir, "eval", tokenizer).items():
        chunks = ppl_rows(arr, length, max_tokens) if max_tokens else rechunk(arr, length)
        chunks = chunks[:n_sequences]
        if len(chunks) == 0:
            raise ShearError(f"{shards_dir}/{domain}/eval.npy: no held-out sequence of {length} tokens, which the "
                             "dynamic mixture needs; raise shards.eval_fraction or add text to the domain")
        x = torch.from_numpy(np.asarray(chunks, dtype=np.int64))
        if bos:  # in the rows, so every consumer scores the same targets (1..L, not 2..L)
            x = torch.cat([torch.full((len(x), 1), tokenizer.bos_token_id, dtype=torch.int64), x], dim=1)
        rows[domain] = x
    return HeldoutRows(rows, ppl_rows_per_pass(batch_size, seq_lens, length, max_positions, bos))


@contextlib.contextmanager
def plain_forward(model):
    """Run `model` without the autocast that accelerate's mixed precision wraps its forward in.

    The reference loss is measured by the evaluate stage in the weights' own dtype; measured
    under bf16 autocast, the same model would differ from it by the rounding alone.
    """
    wrapped = [m for m in model.modules() if "_original_forward" in vars(m) and "forward" in vars(m)]
    saved = [m.forward for m in wrapped]
    for m in wrapped:
        m.forward = m._original_forward
    try:
        yield
    finally:
        for m, forward in zip(wrapped, saved):
            m.forward = forward


def domain_losses(model, rows: dict[str, torch.Tensor], batch_size: Optional[int] = None) -> dict[str, float]:
    """Mean next-token NLL (natural log) of the model on each domain's rows, measured by the evaluate
    stage's `perplexity` (shear.evaluate; float32 log-softmax, float64 sums), without autocast.

    batch_size: rows per forward pass; None = the rows' own `rows_per_pass` (`heldout_rows`), 8 for a
    plain dict. Dropout is off while measuring and the training mode is restored after.
    """
    batch_size = batch_size or getattr(rows, "rows_per_pass", 8)
    with plain_forward(model):
        return {d: perplexity(model, x, batch_size, desc=f"held-out loss {d}")["loss"] for d, x in rows.items()}


def continued_weights(pruned_record: dict, where: str, domains: list[str]) -> Optional[dict[str, float]]:
    """The weights a dynamic retraining starts from: the final weights of the pruning run's dynamic
    mixture, recorded in the pruned model's shear.json (`where`); None when the pruning run had no
    dynamic mixture (depth, width, or a fixed mixture).

    Sheared-LLaMA continues pre-training from the pruning run's final domain weights
    (LLM-Shearing's continue_pretrain.sh: "final proportion of pruning"), not from the
    initial ones.
    """
    if "mixture" not in pruned_record:
        return None
    record = MixtureRecord.from_dict(pruned_record["mixture"], f"{where} mixture")
    if record.kind != "dynamic":
        return None
    if sorted(record.final_weights) != sorted(domains):
        raise ShearError(f"{where}: the pruning run's mixture has domains {sorted(record.final_weights)}, but the "
                         f"shards have {sorted(domains)}; re-run the prune stage on these shards")
    return dict(record.final_weights)


def reference_losses(base_metrics_path: str | Path, given: Optional[dict[str, float]], domains: list[str],
                     seq_len: int = HELDOUT_SEQ_LEN) -> dict[str, float]:
    """Each domain's reference loss: `given` (mixture.reference_loss) or the base model's eval loss
    at `seq_len` (`loss.<seq_len>` of its metrics.json, shear.records.EvalMetrics)."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(domains))
    if unknown:
        raise ShearError(f"params.yaml: mixture.reference_loss names unknown domain {unknown[0]!r}; "
                         f"domains: {', '.join(domains)}")
    missing = [d for d in domains if d not in given]
    measured = {}
    if missing:
        path = Path(base_metrics_path)
        if not path.is_file():
            raise ShearError(f"{path}: not found; the dynamic mixture needs the base model's per-domain loss "
                             "(run the evaluate stage for base) or mixture.reference_loss for every domain")
        measured = EvalMetrics.from_dict(read_json(path), str(path)).loss.get(str(seq_len), {})
    ref = {}
    for d in domains:
        if d in given and not (isinstance(given[d], (int, float)) and math.isfinite(given[d])):
            raise ShearError(f"params.yaml: mixture.reference_loss.{d}={given[d]!r} is not a finite number")
        value = given.get(d, measured.get(d))
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ShearError(f"{base_metrics_path}: no finite loss.{seq_len}.{d}; give mixture.reference_loss.{d} "
                             "or re-run the evaluate stage for base")
        ref[d] = float(value)
    return ref


def log_mixture(live, sampler: DomainSampler, losses: dict[str, float], step: int) -> None:
    """Log `mixture/weight/<domain>` and `mixture/loss/<domain>` to a DVCLive `Live` at `step`.

    Writes the rows at `step` and leaves `live.step` as it was: the caller's own loop keeps
    owning `next_step`.
    """
    previous = live.step
    live.step = step
    for d in sampler.domains:
        live.log_metric(f"mixture/weight/{d}", float(sampler.weights[d]), plot=True)
        if d in losses:
            live.log_metric(f"mixture/loss/{d}", float(losses[d]), plot=True)
    live.step = previous


def plot_weights(sampler: DynamicDomainSampler, path: str | Path, update_every: int = 1) -> Path:
    """A PNG of each domain's weight from its initial value (step 0) over the sampler's updates
    (x = optimizer step when `update_every` is given)."""
    fig, ax = pyplot().subplots(figsize=(7, 4))
    if sampler.history:
        trajectory = [sampler.initial_weights] + [h["weights"] for h in sampler.history]
        steps = [update_every * i for i in range(len(trajectory))]
        for d in sampler.domains:
            ax.plot(steps, [w[d] for w in trajectory], label=d)
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no mixture updates", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("optimizer step" if update_every > 1 else "update")
    ax.set_ylabel("domain weight")
    ax.set_title("dynamic batch loading: domain weights")
    fig.tight_layout()
    path = Path(path)
    save_png(fig, path)
    return path
