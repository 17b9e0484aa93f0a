"""Typed records of what stages hand each other, and the constants two stages must agree on.

Every file one stage writes and another reads has a dataclass here (litgpt's style: the
contract is a type, not a set of dict keys spread over readers):

- `ModelShape`: a LLaMA shape (the size fields of a config, `head_dim` explicit);
- `ModelRecord`: `shear.json` beside every checkpoint: how it was made, its architecture,
  its parameter counts;
- `MixtureRecord`: its `mixture` section after sheared pruning: the domain weights the
  pruning run ended with, where a dynamic retraining continues from;
- `EvalMetrics`: `reports/eval/<model>/metrics.json` of the evaluate stage;
- `SpeedRecord`: `reports/speed.json` of the speed stage (every model timed in one run);
- `WidthScoreSummary`: the small JSON beside a width-score tensor file of the score stage.

`to_dict()` gives the JSON a writer writes; `from_dict(data, where)` reads it back and
fails with one line naming the file and the missing or wrong key.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from shear.errors import ShearError
from shear.paths import MODEL_NAMES  # noqa: F401 (part of the records' vocabulary)

# The model every speed-up and retention is measured against.
REFERENCE_MODEL = "base"


def _need(data: Any, key: str, where: str, kind: type | tuple[type, ...]) -> Any:
    """data[key] checked to be a `kind`, or a one-line ShearError naming `where` and the key."""
    if not isinstance(data, dict) or key not in data:
        raise ShearError(f"{where}: no {key!r}; re-run the stage that writes it")
    value = data[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise ShearError(f"{where}: {key}={value!r} is not a {getattr(kind, '__name__', kind)}; "
                         "re-run the stage that writes it")
    return value


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b.c": leaf}, the way DVC shows metrics and params."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flatten(value, path + ".")
        else:
            flat[path] = value
    return flat


def non_numeric_keys(metrics: dict, strings_allowed: tuple[str, ...] = ("info",)) -> list[str]:
    """Dotted keys of a metrics file whose values `dvc metrics diff` cannot compare as numbers.

    None and lists are dropped by DVC and NaN is not JSON. Strings are shown but not
    diffed, so they are allowed only under the top-level sections `strings_allowed`
    (labels such as the device name, or in reports/speed.json the decode path chosen).
    """
    bad = []
    for key, value in flatten(metrics).items():
        if isinstance(value, str) and key.split(".")[0] in strings_allowed:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            bad.append(key)
    return bad


def batch_key(batch: int) -> str:
    """The key of a batch size's row in a speed section (`batch.bs8`) and in `speedup` (`bs8`)."""
    return f"bs{batch}"


def batch_rows(section: dict) -> dict[int, dict[str, Any]]:
    """{batch size: row} of a speed section's `batch` rows, smallest batch first ({} without any)."""
    rows = section.get("batch", {})
    return dict(sorted((int(key.removeprefix("bs")), row) for key, row in rows.items()))


# ----------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelShape:
    """The size fields of a LLaMA config (width pruning keeps `head_dim`)."""

    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    head_dim: int

    @classmethod
    def from_dict(cls, data: dict, where: str) -> ModelShape:
        """The shape in `data` (extra keys, e.g. vocab_size, are ignored)."""
        return cls(**{f.name: _need(data, f.name, where, int) for f in fields(cls)})

    def describe(self) -> str:
        """One line for tables: "24 L · d 576 · 9/3 heads · MLP 1536"."""
        return (f"{self.num_hidden_layers} L · d {self.hidden_size} · {self.num_attention_heads}/"
                f"{self.num_key_value_heads} heads · MLP {self.intermediate_size}")


@dataclass(frozen=True)
class ParameterCounts:
    """Parameters of a model: all of them (tied weights once) and those outside the embeddings."""

    total: int
    non_embedding: int

    @classmethod
    def from_dict(cls, data: dict, where: str) -> ParameterCounts:
        return cls(total=_need(data, "total", where, int), non_embedding=_need(data, "non_embedding", where, int))


@dataclass
class ModelRecord:
    """`shear.json`: how a checkpoint was made (`method` and method-specific `details`: source,
    criterion, removed blocks, retraining, ...), its architecture and its parameter counts.

    `architecture` keeps every key `shear.models.architecture` writes (model_type, vocab_size,
    ...); `shape` is its size part. A record of an older checkpoint may lack both.
    """

    method: str
    architecture: dict[str, Any] = field(default_factory=dict)
    parameters: ParameterCounts | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict, where: str) -> ModelRecord:
        if not isinstance(data, dict):
            raise ShearError(f"{where}: not a shear.json record (a JSON object); re-run the stage that wrote the model")
        method = data.get("method", "unknown")
        architecture = data.get("architecture") or {}
        if architecture:
            ModelShape.from_dict(architecture, f"{where} architecture")  # checked here, once
        params = data.get("parameters")
        counts = ParameterCounts.from_dict(params, f"{where} parameters") if params is not None else None
        details = {k: v for k, v in data.items() if k not in ("method", "architecture", "parameters")}
        return cls(method=str(method), architecture=dict(architecture), parameters=counts, details=details)

    @property
    def shape(self) -> ModelShape | None:
        return ModelShape.from_dict(self.architecture, "shear.json architecture") if self.architecture else None

    @property
    def criterion(self) -> str | None:
        """The importance criterion that chose what was removed (depth and width pruning)."""
        return self.details.get("criterion")

    def to_dict(self) -> dict[str, Any]:
        out = {"method": self.method, **self.details}
        if self.architecture:
            out["architecture"] = dict(self.architecture)
        if self.parameters is not None:
            out["parameters"] = asdict(self.parameters)
        return out


@dataclass
class MixtureRecord:
    """`mixture` in the shear.json of a sheared-pruned model: the run's mixture `kind` (fixed |
    dynamic), its `final_weights` per domain and, when dynamic, the update `history`
    ([{"weights", "losses"}] per update, shear.mixture.DynamicDomainSampler)."""

    kind: str
    final_weights: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict, where: str) -> MixtureRecord:
        weights = _need(data, "final_weights", where, dict)
        bad = [d for d, w in weights.items()
               if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0]
        if bad or not weights or sum(weights.values()) <= 0:
            raise ShearError(f"{where}: final_weights must be finite weights >= 0 with a positive sum"
                             f"{f' (not {bad[0]}={weights[bad[0]]!r})' if bad else ''}; re-run the stage that writes it")
        return cls(kind=_need(data, "kind", where, str), final_weights={d: float(w) for d, w in weights.items()},
                   history=list(data.get("history") or []))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "final_weights": dict(self.final_weights), "history": list(self.history)}


# ----------------------------------------------------------------------------- evaluation


@dataclass
class EvalMetrics:
    """`reports/eval/<model>/metrics.json` (the evaluate stage; schema in shear/evaluate.py).

    `ppl[len][domain]` and `loss[len][domain]` include the domain "mean"; lengths are the
    requested ones as strings. `info` holds labels (model, device, dtype, versions): the only
    strings, which `dvc metrics diff` shows without diffing.
    """

    params: ParameterCounts
    ppl: dict[str, dict[str, float]]
    loss: dict[str, dict[str, float]]
    ppl_protocol: dict[str, Any]
    tasks: dict[str, dict[str, float]] = field(default_factory=dict)
    retention: dict[str, Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict, where: str) -> EvalMetrics:
        return cls(params=ParameterCounts.from_dict(_need(data, "params", where, dict), f"{where} params"),
                   ppl=_need(data, "ppl", where, dict), loss=_need(data, "loss", where, dict),
                   ppl_protocol=_need(data, "ppl_protocol", where, dict), tasks=data.get("tasks") or {},
                   retention=data.get("retention"), info=data.get("info") or {})

    def to_dict(self) -> dict[str, Any]:
        out = {"params": asdict(self.params), "ppl": self.ppl, "loss": self.loss, "ppl_protocol": self.ppl_protocol,
               "tasks": self.tasks}
        if self.retention is not None:
            out["retention"] = self.retention
        out["info"] = self.info
        return out

    def domain_losses(self, seq_len: int, where: str) -> dict[str, float]:
        """Per-domain mean NLL at `seq_len` (without "mean"): the dynamic mixture's reference."""
        losses = self.loss.get(str(seq_len))
        if not losses:
            raise ShearError(f"{where}: no loss at {seq_len} tokens; evaluate.ppl_seq_lens must contain "
                             f"{seq_len} (the dynamic mixture's reference length): add it and re-run evaluate")
        return {d: v for d, v in losses.items() if d != "mean" and isinstance(v, (int, float)) and math.isfinite(v)}


@dataclass
class SpeedRecord:
    """`reports/speed.json` (the speed stage): every model timed in one process, runs interleaved.

    `models[name]` is a `shear.speed.compare_speed` section (path, dtype, `batch.bs<N>` rows
    with decode ms/token, tokens/s, prefill ms, floors, memory); `speedup[name]` is that
    model's speed-up over `reference` measured in the same run; `info` the machine.
    """

    reference: str
    models: dict[str, dict[str, Any]]
    speedup: dict[str, dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict, where: str) -> SpeedRecord:
        models = _need(data, "models", where, dict)
        for name, section in models.items():
            _need(section, "batch", f"{where} models.{name}", dict)
        return cls(reference=_need(data, "reference", where, str), models=models,
                   speedup=_need(data, "speedup", where, dict), info=data.get("info") or {})

    def to_dict(self) -> dict[str, Any]:
        return {"reference": self.reference, "models": self.models, "speedup": self.speedup, "info": self.info}

    def batches(self, name: str) -> dict[int, dict[str, Any]]:
        """{batch size: row} of model `name`, smallest first ({} for a model not timed)."""
        return batch_rows(self.models.get(name, {}))

    def decode_speedup(self, name: str, batch: int) -> float | None:
        """Decode speed-up of `name` over the reference at `batch` (1.0 for the reference itself)."""
        if name == self.reference:
            return 1.0 if batch in self.batches(name) else None
        return self.speedup.get(name, {}).get(batch_key(batch), {}).get("decode")


# ----------------------------------------------------------------------------- scores


@dataclass
class WidthScoreSummary:
    """The JSON beside `width_<criterion>.safetensors`: what was scored and how (the tensors
    themselves are in the binary file, a DVC-cached output)."""

    criterion: str
    shape: ModelShape
    calibration: dict[str, int] | None  # {"sequences", "seq_len"}; None for weight-only criteria
    tensors: dict[str, list[int]]  # name -> tensor shape, as stored in the binary file
    file: str  # the tensor file's name, next to the stage's binary outputs

    @classmethod
    def from_dict(cls, data: dict, where: str) -> WidthScoreSummary:
        return cls(criterion=_need(data, "criterion", where, str),
                   shape=ModelShape.from_dict(_need(data, "shape", where, dict), f"{where} shape"),
                   calibration=data.get("calibration"), tensors=_need(data, "tensors", where, dict),
                   file=_need(data, "file", where, str))

    def to_dict(self) -> dict[str, Any]:
        return {"criterion": self.criterion, "shape": asdict(self.shape), "calibration": self.calibration,
                "tensors": self.tensors, "file": self.file}
