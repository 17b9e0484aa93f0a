"""Models: load from a source (GGUF, local HF dir, tiny random), save with shear.json, facts.

Every model that leaves a stage is a standard Hugging Face checkpoint (safetensors,
config.json, tokenizer) that `AutoModelForCausalLM.from_pretrained` loads with no custom
code, plus a `shear.json` recording its architecture, parameter counts and how it was made.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shear.errors import ShearError
from shear.io import atomic_dir, read_json
from shear.records import ModelRecord

# Families whose blocks have LLaMA's layout (model.layers[i].self_attn.{q,k,v,o}_proj,
# mlp.{gate,up,down}_proj, RMSNorms, RoPE), model_type -> architecture. What differs between
# them (biases, q/k norms, Gemma's extra norms and scaled embeddings) is described by `layout`.
# Phi-3 is refused: its fused qkv_proj / gate_up_proj would need every method to split them.
FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
SUPPORTED_ARCHITECTURES = tuple(FAMILIES.values())

TINY_DEFAULTS = {"layers": 4, "hidden": 64, "heads": 4, "kv_heads": 2, "mlp": 128, "vocab": 320, "tied": 1}


def offline() -> None:
    """Forbid any network access by the HF libraries (set by every stage)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 1 << 20


def return_freed_memory() -> None:
    """Make freed tensors of 1 MiB and more go back to the system at once (glibc), so a stage's
    peak RSS is its peak of live tensors, which shear.plan estimates.

    glibc serves allocations below a threshold from its heap, and raises that threshold (up
    to 32 MiB) when a larger block is freed; activations of a few MiB then cycle through the
    heap, where fragmentation held LoRA retraining's peak RSS on the default model 1.7 GiB
    (44%) above its live tensors (bench/results/memory_plan.md). A fixed threshold gives
    every tensor of 1 MiB or more its own mapping, unmapped when it is freed; the price is
    the page faults of fresh mappings: +10-25% wall time on forward and backward passes of the
    default model (alternated A/B, 2 threads). So only the training stages (retrain, prune),
    whose peak the plan must get right, call it; read-only stages keep glibc's faster default
    and stay within 20% of their plan without it. No-op where the C library is not glibc.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str = "auto") -> torch.device:
    """`auto` is CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ShearError("params.yaml: run.device=cuda but no CUDA device is visible; use auto or cpu")
    return torch.device(name)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """The dtype models load in: `auto` is bfloat16 on CUDA and float32 on CPU.

    This is the dtype of weights that are only read (scoring, evaluation, speed, a
    distillation teacher, LoRA's frozen base) and of the models depth and width pruning
    load, cut and save. Training keeps in float32 what the optimizer updates,
    whatever this says: the trained weights themselves (bf16 has 8 mantissa bits, so an
    update lr * m / sqrt(v) below 2^-8 of a weight is rounded away and training stalls),
    their gradients (accumulated over micro-batches and clipped by a global norm), AdamW's
    two moments (v holds squared gradients, far below bf16's useful range relative to
    the weights), the hard-concrete log-alphas and the Lagrange multipliers; the forward
    and backward run under bf16 autocast when this is bf16 (shear.trainer.make_accelerator).
    A merged LoRA model is saved in float32. Losses and perplexity are computed from
    float32 log-softmax in every case.
    """
    device = torch.device(device)
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ShearError(f"params.yaml: run.dtype={name!r} is not valid; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


# ----------------------------------------------------------------------------- tokenizers


def byte_tokenizer():
    """A byte-level tokenizer (256 bytes + 3 specials) for tiny test models; no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    specials = ["<|endoftext|>", "<|bos|>", "<|pad|>"]
    for s in specials:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|bos|>", pad_token="<|pad|>"
    )


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the tokenizer's vocabulary, merges and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    specials = json.dumps([tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token])
    return hashlib.sha256((body + specials).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- facts


def check_supported(config, where: str) -> None:
    """Refuse a model whose architecture is not LlamaForCausalLM-compatible."""
    archs = list(getattr(config, "architectures", None) or [])
    model_type = getattr(config, "model_type", "?")
    if model_type not in FAMILIES or (archs and FAMILIES[model_type] not in archs):
        raise ShearError(
            f"{where}: model type {model_type!r} ({', '.join(archs) or 'no architectures'}) is not "
            f"LlamaForCausalLM-compatible; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )


def head_dim(config) -> int:
    """The per-head dimension, explicit in the config or hidden_size / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


# The layout of a plain LLaMA block (SmolLM2, Llama-2/3, Mistral): see `layout`.
PLAIN_LAYOUT = {"qkv_bias": False, "o_bias": False, "mlp_bias": False, "qk_norm": False, "norms_per_block": 2,
                "post_norms": False, "unit_offset_norm": False, "embed_scale": False}


def layout(config) -> dict[str, Any]:
    """What a block of this family holds beyond LLaMA's weights, and how its norms behave.

    qkv_bias / o_bias / mlp_bias: biases on q,k,v / o / gate,up,down (Qwen2 always has q,k,v
    biases; Llama, Qwen3 and Gemma 3 follow `attention_bias` / `mlp_bias`); qk_norm: a q_norm and
    a k_norm over head_dim (Qwen3, Gemma 3); norms_per_block: hidden-sized RMSNorms per block
    (Gemma 3 adds pre/post feed-forward norms); post_norms: the attention and MLP outputs pass an
    RMSNorm before the residual add (Gemma 3); unit_offset_norm: RMSNorm scales by (1 + w), not
    w (Gemma 3); embed_scale: embeddings are multiplied by sqrt(hidden_size) (Gemma 3).
    """
    family = config.model_type
    gemma = family == "gemma3_text"
    attention_bias = bool(getattr(config, "attention_bias", False)) and family in ("llama", "qwen3", "gemma3_text")
    return {
        "qkv_bias": attention_bias or family == "qwen2",
        "o_bias": attention_bias,
        "mlp_bias": family == "llama" and bool(getattr(config, "mlp_bias", False)),
        "qk_norm": family in ("qwen3", "gemma3_text"),
        "norms_per_block": 4 if gemma else 2,
        "post_norms": gemma,
        "unit_offset_norm": gemma,
        "embed_scale": gemma,
    }


def block_norms(layer) -> list:
    """The hidden-sized RMSNorms of a block (input, post-attention and, in Gemma 3, pre/post feed-forward)."""
    return [m for name, m in layer.named_children() if name.endswith("layernorm")]


def norm_feeding(layer) -> tuple:
    """The norms whose outputs are the attention and the MLP inputs."""
    return layer.input_layernorm, getattr(layer, "pre_feedforward_layernorm", layer.post_attention_layernorm)


def residual_writers(layer) -> list[tuple]:
    """(projection, module whose output is added to the residual stream) for attention and MLP:
    the projection itself, or in Gemma 3 the norm that follows it."""
    attn, mlp = layer.self_attn.o_proj, layer.mlp.down_proj
    if hasattr(layer, "post_feedforward_layernorm"):
        return [(attn, layer.post_attention_layernorm), (mlp, layer.post_feedforward_layernorm)]
    return [(attn, attn), (mlp, mlp)]


# Tensor-parallel degrees a shape can be checked for (and the planner can prefer).
TP_DEGREES = (8, 4, 2, 1)


def tensor_parallel(shape: dict, limit: int = 8) -> int:
    """The largest of 8, 4, 2, 1 (at most `limit`) devices this shape splits over evenly for
    tensor parallelism: query heads and MLP neurons divide by it, and KV heads divide by it
    or it by them (serving engines replicate KV heads when there are fewer than devices)."""
    for t in (t for t in TP_DEGREES if t <= limit):
        nkv = shape["num_key_value_heads"]
        if (shape["num_attention_heads"] % t == 0 and shape["intermediate_size"] % t == 0
                and (nkv % t == 0 or t % nkv == 0)):
            return t
    return 1


def architecture(config) -> dict[str, Any]:
    """Architecture facts recorded in shear.json and used by planners."""
    return {
        "model_type": config.model_type,
        "num_hidden_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": head_dim(config),
        "intermediate_size": config.intermediate_size,
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
    }


def lm_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from final hidden states as the model's own forward computes them: the LM head,
    then the family's final logit soft-capping (Gemma 3: cap * tanh(logits / cap))."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def count_parameters(model) -> dict[str, int]:
    """Total (tied weights counted once) and non-embedding parameter counts."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    embedding = model.get_input_embeddings().weight.numel()
    out = model.get_output_embeddings()
    if out is not None and out.weight is not model.get_input_embeddings().weight:
        embedding += out.weight.numel()
    return {"total": total, "non_embedding": total - embedding}


def block_parameters(model) -> int:
    """Parameters inside the transformer blocks (what depth pruning removes)."""
    return sum(p.numel() for p in model.model.layers.parameters())


# ----------------------------------------------------------------------------- sources


def parse_tiny_shape(spec: str) -> dict[str, int]:
    """`layers=4,hidden=64,heads=4,kv_heads=2,mlp=128,vocab=320,tied=1` -> dict (defaults fill gaps)."""
    shape = dict(TINY_DEFAULTS)
    for part in filter(None, spec.split(",")):
        key, _, value = part.partition("=")
        key = key.strip()
        if key not in shape or not value.strip().isdigit():
            raise ShearError(
                f"params.yaml: base.source=tiny:{spec} has bad item {part!r}; "
                f"use key=int with keys {', '.join(TINY_DEFAULTS)}"
            )
        shape[key] = int(value)
    if shape["hidden"] % shape["heads"] or shape["heads"] % shape["kv_heads"]:
        raise ShearError(
            f"params.yaml: base.source=tiny:{spec} needs hidden divisible by heads and heads by kv_heads"
        )
    return shape


def make_tiny_model(spec: str = "", seed: int = 0):
    """A random-weight LlamaForCausalLM of a tiny shape with a byte-level tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = parse_tiny_shape(spec)
    tokenizer = byte_tokenizer()
    vocab = max(shape["vocab"], len(tokenizer))
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=shape["hidden"],
        intermediate_size=shape["mlp"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        head_dim=shape["hidden"] // shape["heads"],
        max_position_embeddings=2048,
        tie_word_embeddings=bool(shape["tied"]),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    return model, tokenizer


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def find_gguf(target: str) -> Path:
    """Locate a GGUF file: an explicit path, or the single .gguf inside an installed package."""
    path = Path(target)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ShearError(f"params.yaml: base.source=gguf:{target}: file not found")
        return path
    spec = importlib.util.find_spec(target) if target.isidentifier() else None
    if spec is None or spec.origin is None:
        raise ShearError(
            f"params.yaml: base.source=gguf:{target}: no such .gguf file or installed package "
            "(install it with `make setup`, or give a path to a .gguf file)"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise ShearError(f"params.yaml: base.source=gguf:{target}: package has no .gguf file in {Path(spec.origin).parent}")
    return files[0]


def load_source(source: str, seed: int = 0):
    """Load `gguf:<pkg|path>`, `hf:<dir>` or `tiny:<shape>` as (float32 model, tokenizer, origin info)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind, _, arg = source.partition(":")
    if kind == "tiny":
        model, tok = make_tiny_model(arg, seed)
        return model, tok, {"source": source}
    if kind == "gguf":
        from transformers import GgufConfig

        file = find_gguf(arg)
        check_gguf(file)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                file.parent, gguf_file=file.name, quantization_config=GgufConfig(dequantize=True),
                dtype=torch.float32,
            )
            tok = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
        except (ValueError, OSError, KeyError, struct.error) as e:
            raise ShearError(f"{file}: cannot read this GGUF file ({first_line(e)}); {GGUF_FIX}") from None
        check_supported(model.config, str(file))
        return model.eval(), tok, {"source": source, "file": file.name, "sha256": _sha256(file)}
    if kind == "hf":
        directory = Path(arg)
        if not (directory / "config.json").is_file():
            raise ShearError(f"params.yaml: base.source=hf:{arg}: no config.json in that directory")
        model, tok = load_checkpoint(directory, torch.float32, "cpu", HF_FIX)
        return model, tok, {"source": source}
    raise ShearError(
        f"params.yaml: base.source={source!r} is not valid; use gguf:<package or file.gguf>, hf:<local dir> or tiny:<shape>"
    )


# ----------------------------------------------------------------------------- checkpoints


# What to do about a damaged checkpoint: one a stage wrote (DVC has it), or a user's `hf:` directory.
REBUILD_FIX = "restore it with `dvc checkout`, or re-run the stage that writes it (`dvc repro --force <stage>`)"
HF_FIX = "copy the complete model (config.json, *.safetensors, tokenizer files) into that directory again"
GGUF_FIX = "the file is truncated or not a GGUF file: download or export it again (`make setup` reinstalls the default)"


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (library messages can span many lines)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def check_gguf(file: Path) -> None:
    """Read a GGUF file's header and tensor table, so a truncated or garbage file stops here in one line.

    The reader checks that every tensor's data lies inside the file; transformers' loader would
    fail later with a bare `struct.error` or a numpy reshape message.
    """
    from gguf import GGUFReader

    try:
        GGUFReader(file)
    except (ValueError, OSError, KeyError, IndexError, struct.error) as e:
        raise ShearError(f"{file}: cannot read this GGUF file ({first_line(e)}); {GGUF_FIX}") from None


def read_config(directory: str | Path, fix: str = REBUILD_FIX):
    """A checkpoint's config (transformers' PretrainedConfig), refusing a missing, non-JSON or
    unsupported config.json in one line that names the file and `fix`."""
    from transformers import AutoConfig

    directory = Path(directory)
    path = directory / "config.json"
    if not path.is_file():
        raise ShearError(f"{directory}: no model here (config.json missing); run the stage that writes it, e.g. `dvc repro`")
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ShearError(f"{path}: not valid JSON ({first_line(e)}); {fix}") from None
    try:
        config = AutoConfig.from_pretrained(directory)
    except (ValueError, OSError, KeyError, TypeError) as e:
        raise ShearError(f"{path}: not a model config transformers can read ({first_line(e)}); {fix}") from None
    check_supported(config, str(directory))
    return config


def check_weights(directory: str | Path, fix: str = REBUILD_FIX) -> list[Path]:
    """A checkpoint's safetensors files, each header read (`safe_open` checks that the tensors
    cover the file exactly), so a missing, truncated or garbage weights file stops in one line
    naming it, before transformers fails inside its loader."""
    from safetensors import SafetensorError, safe_open

    directory = Path(directory)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ShearError(f"{directory}: no weights (no *.safetensors file next to config.json); {fix}")
    for file in files:
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise ShearError(f"{file}: truncated or not a safetensors file ({first_line(e)}); {fix}") from None
    return files


def load_tokenizer(directory: str | Path, fix: str = REBUILD_FIX):
    """A checkpoint's tokenizer, refusing missing or unreadable tokenizer files in one line."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    if not any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ShearError(f"{directory}: no tokenizer (no tokenizer.json, tokenizer.model or vocab.json); {fix}")
    try:
        return AutoTokenizer.from_pretrained(directory)
    except (ValueError, OSError, KeyError, TypeError) as e:  # a non-JSON tokenizer.json is a ValueError
        raise ShearError(f"{directory}: cannot load the tokenizer ({first_line(e)}); {fix}") from None


def load_checkpoint(directory: Path, dtype: torch.dtype, device: str | torch.device, fix: str):
    """(model in eval mode, tokenizer) of a standard checkpoint directory; every damaged or
    missing file is one ShearError naming it and `fix`, checked before the weights are read."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    read_config(directory, fix)
    check_weights(directory, fix)
    tokenizer = load_tokenizer(directory, fix)
    device = torch.device(device)
    # No "Loading weights" bar on stderr: a stage that stops later (a bad LoRA module name, a
    # missing score file) must print its one error line alone there.
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        # On CUDA the weights go straight from the files to the device (no full host copy).
        placement = {"device_map": {"": device}} if device.type == "cuda" else {}
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **placement).to(device).eval()
    except (ValueError, OSError, RuntimeError, KeyError) as e:
        raise ShearError(f"{directory}: cannot load the model ({first_line(e)}); {fix}") from None
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return model, tokenizer


def load_model(directory: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load a checkpoint a stage wrote in `dtype` (see `resolve_dtype`) on `device`:
    (model in eval mode, tokenizer, shear.json record)."""
    directory = Path(directory)
    model, tokenizer = load_checkpoint(directory, dtype, device, REBUILD_FIX)
    record = read_json(directory / "shear.json") if (directory / "shear.json").exists() else {}
    return model, tokenizer, record


def save_model(model, tokenizer, directory: str | Path, record: dict[str, Any]) -> dict[str, Any]:
    """Write a standard checkpoint + tokenizer + shear.json atomically; returns the shear.json dict.

    `record` says how the model was made (source, method, removed units, ...); the
    architecture facts and parameter counts are added here so they always match the weights.
    """
    config = model.config
    info = ModelRecord.from_dict({
        **record,
        "architecture": architecture(config),
        "layout": layout(config),
        # the largest of 8/4/2/1 devices the heads and MLP split over evenly (tensor parallelism)
        "tensor_parallel": tensor_parallel({k: getattr(config, k) for k in (
            "num_attention_heads", "num_key_value_heads", "intermediate_size")}),
        "parameters": count_parameters(model),
    }, f"{directory}/shear.json").to_dict()
    model.config.architectures = [type(model).__name__]
    with atomic_dir(directory) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _for_older_readers(tmp)
        (tmp / "shear.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def legacy_config_keys(config: dict[str, Any]) -> dict[str, Any]:
    """The config.json keys transformers 4.x reads that 5.x writes under other names.

    4.x reads `torch_dtype` (5.x: `dtype`) and the RoPE settings from top-level `rope_theta` and
    `rope_scaling` (5.x: `rope_parameters`; Gemma 3: one entry per layer type, the sliding one
    being 4.x's `rope_local_base_freq`). A missing key is read silently as a default (Llama-3's
    theta 500000 as 10000, no llama3 scaling), so the model would load and compute wrong logits.
    """
    extra: dict[str, Any] = {}
    if "dtype" in config:
        extra["torch_dtype"] = config["dtype"]
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "full_attention" in rope:
        if "sliding_attention" in rope:
            extra["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
        rope = rope["full_attention"]
    if isinstance(rope, dict) and "rope_theta" in rope:
        extra["rope_theta"] = rope["rope_theta"]
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        extra["rope_scaling"] = scaling if scaling.get("rope_type", "default") != "default" else None
    return {k: v for k, v in extra.items() if k not in config}


def _for_older_readers(directory: Path) -> None:
    """Make a saved checkpoint readable by transformers 4.x as well: the legacy config keys,
    and a tokenizer class 4.x knows (5.x writes `TokenizersBackend`; the tokenizer.json beside
    it holds the whole tokenizer, which 4.x's PreTrainedTokenizerFast loads as it is)."""
    path = directory / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, **legacy_config_keys(config)}, indent=2, sort_keys=True) + "\n")
    path = directory / "tokenizer_config.json"
    if path.is_file() and (directory / "tokenizer.json").is_file():
        tok = json.loads(path.read_text())
        if tok.get("tokenizer_class") == "TokenizersBackend":
            tok["tokenizer_class"] = "PreTrainedTokenizerFast"
            path.write_text(json.dumps(tok, indent=2, ensure_ascii=False) + "\n")
