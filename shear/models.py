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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shear.errors import ShearError
from shear.io import atomic_dir, read_json

# Architectures whose weights have LLaMA's layout (model.layers[i].self_attn.{q,k,v,o}_proj,
# mlp.{gate,up,down}_proj, RMSNorm, RoPE), so every pruning method applies unchanged.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

TINY_DEFAULTS = {"layers": 4, "hidden": 64, "heads": 4, "kv_heads": 2, "mlp": 128, "vocab": 320, "tied": 1}


def offline() -> None:
    """Forbid any network access by the HF libraries (set by every stage)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
    known = {"llama", "mistral", "qwen2"}
    if model_type not in known or (archs and not set(archs) & set(SUPPORTED_ARCHITECTURES)):
        raise ShearError(
            f"{where}: model type {model_type!r} ({', '.join(archs) or 'no architectures'}) is not "
            f"LlamaForCausalLM-compatible; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )


def head_dim(config) -> int:
    """The per-head dimension, explicit in the config or hidden_size / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


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
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kind, _, arg = source.partition(":")
    if kind == "tiny":
        model, tok = make_tiny_model(arg, seed)
        return model, tok, {"source": source}
    if kind == "gguf":
        from transformers import GgufConfig

        file = find_gguf(arg)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                file.parent, gguf_file=file.name, quantization_config=GgufConfig(dequantize=True),
                dtype=torch.float32,
            )
            tok = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
        except (ValueError, OSError, KeyError) as e:
            raise ShearError(f"{file}: cannot read this GGUF file ({str(e).splitlines()[0]})") from None
        check_supported(model.config, str(file))
        return model.eval(), tok, {"source": source, "file": file.name, "sha256": _sha256(file)}
    if kind == "hf":
        directory = Path(arg)
        if not (directory / "config.json").is_file():
            raise ShearError(f"params.yaml: base.source=hf:{arg}: no config.json in that directory")
        config = AutoConfig.from_pretrained(directory)
        check_supported(config, str(directory))
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(directory)
        return model.eval(), tok, {"source": source}
    raise ShearError(
        f"params.yaml: base.source={source!r} is not valid; use gguf:<package or file.gguf>, hf:<local dir> or tiny:<shape>"
    )


# ----------------------------------------------------------------------------- checkpoints


def load_model(directory: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load a checkpoint a stage wrote: (model in eval mode, tokenizer, shear.json record)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ShearError(f"{directory}: no model here (config.json missing); run the stage that writes it, e.g. `dvc repro`")
    try:
        config = AutoConfig.from_pretrained(directory)
    except (ValueError, OSError) as e:
        raise ShearError(f"{directory}/config.json: corrupt ({str(e).splitlines()[0]})") from None
    check_supported(config, str(directory))
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (ValueError, OSError, RuntimeError) as e:
        raise ShearError(f"{directory}: cannot load the model ({str(e).splitlines()[0]})") from None
    record = read_json(directory / "shear.json") if (directory / "shear.json").exists() else {}
    return model, tokenizer, record


def save_model(model, tokenizer, directory: str | Path, record: dict[str, Any]) -> dict[str, Any]:
    """Write a standard checkpoint + tokenizer + shear.json atomically; returns the shear.json dict.

    `record` says how the model was made (source, method, removed units, ...); the
    architecture facts and parameter counts are added here so they always match the weights.
    """
    info = {
        **record,
        "architecture": architecture(model.config),
        "parameters": count_parameters(model),
    }
    model.config.architectures = [type(model).__name__]
    with atomic_dir(directory) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "shear.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
