"""Domain sampler: draws training batches from per-domain shards by mixture weights.

Used by sheared pruning and by retraining. `DomainSampler` keeps its weights fixed;
its state (weights, RNG, per-domain cursors) is part of every training checkpoint so a
resumed run draws exactly the batches the uninterrupted run would have.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from shear.data import rechunk
from shear.errors import ShearError


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
        self.weights = dict(state["weights"])
        self.rng.bit_generator.state = state["rng"]
        self.order = {d: np.asarray(o) for d, o in state["order"].items()}
        self.cursor = dict(state["cursor"])
