"""Export a checkpoint to GGUF, the file format of llama.cpp (and Ollama, LM Studio, llama-cpp-python).

One GGUF file holds the weights in one format (f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1) and
everything a runtime needs to run them: llama architecture metadata with explicit key/value
head length (a width-pruned model has head_dim != hidden / heads), RoPE base and scaling,
norm epsilon, context length, the byte-level BPE tokenizer, and the shear.json facts under
`shear.*` keys. Quantization uses the `gguf` package's numpy quantizers, the same code
llama.cpp's own converter calls.

Two details that make a file right rather than merely loadable:
- llama.cpp's llama graph applies RoPE to interleaved pairs (x0, x1), (x2, x3), ... while HF
  rotates the two halves of each head; convert_hf_to_gguf.py permutes the rows of q_proj and
  k_proj per head so both compute the same thing, and readers (transformers' GGUF loader)
  un-permute. We apply the same permutation.
- Block formats quantize each row in blocks of 32 values; a tensor whose rows do not divide
  into blocks (an odd MLP width after pruning) is stored in f16 and listed under
  `shear.export.f16_fallback`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shear.errors import ShearError
from shear.evaluate import tokenizer_adds_bos
from shear.io import atomic_file
from shear.models import head_dim

# The type of the 2-D weights (1-D tensors are always f32; general.file_type says which).
FORMATS = ("f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")

# HF model_type -> GGUF architecture. Mistral without a sliding window is llama in llama.cpp
# (its converter writes MistralForCausalLM as `llama` too).
GGUF_ARCH = {"llama": "llama", "mistral": "llama"}

# HF parameter suffix inside a block -> GGUF tensor name inside `blk.N.`
BLOCK_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.o_proj.bias": "attn_output.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.gate_proj.bias": "ffn_gate.bias",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.up_proj.bias": "ffn_up.bias",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.down_proj.bias": "ffn_down.bias",
}
TOP_TENSORS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}

# llama.cpp's pre-tokenizer names for the split rules a HF byte-level tokenizer can have.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_PRE = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2", GPT2_SPLIT: "gpt-2"}


def check_format(fmt: str, where: str = "params.yaml: export.formats") -> None:
    """Refuse a format name the writer does not have."""
    if fmt not in FORMATS:
        raise ShearError(f"{where}: {fmt!r} is not a GGUF format this writer makes; use one of {', '.join(FORMATS)}")


def check_exportable(config, where: str) -> str:
    """The GGUF architecture for `config`, or one ShearError line saying why it cannot be exported."""
    model_type = getattr(config, "model_type", "?")
    if model_type not in GGUF_ARCH:
        raise ShearError(
            f"{where}: GGUF export supports {', '.join(sorted(GGUF_ARCH))} models (LlamaForCausalLM layout); "
            f"this one is {model_type!r}"
        )
    window = getattr(config, "sliding_window", None)
    if window and window < config.max_position_embeddings:
        raise ShearError(f"{where}: sliding-window attention ({window}) has no llama GGUF form; export needs sliding_window: null")
    if (getattr(config, "hidden_act", "silu") or "silu") != "silu":
        raise ShearError(f"{where}: hidden_act={config.hidden_act!r}; the llama GGUF graph computes SiLU only")
    rope_type = rope_parameters(config).get("rope_type", "default")
    if rope_type not in ("default", "linear", "llama3"):
        raise ShearError(f"{where}: rope_type={rope_type!r} is not exported; supported: default, linear, llama3")
    return GGUF_ARCH[model_type]


def rope_parameters(config) -> dict[str, Any]:
    """RoPE theta and scaling as one dict (transformers 5 `rope_parameters`, or 4.x top-level keys)."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    params.setdefault("rope_type", params.pop("type", "default"))
    return params


def llama3_rope_factors(params: dict[str, Any], dim: int) -> np.ndarray:
    """Per-frequency divisors of LLaMA-3.1 RoPE scaling, as llama.cpp's `rope_freqs` tensor holds them."""
    freqs = 1.0 / (params["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    factor = params.get("factor", 8.0)
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old_len = params.get("original_max_position_embeddings", 8192)
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            out.append(1.0)
        elif wavelen > old_len / low:
            out.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def permute_rope(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder each head's rows from HF's half-split RoPE layout to llama.cpp's interleaved pairs
    (convert_hf_to_gguf.py `LlamaModel.permute`; transformers' GGUF reader inverts it)."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


# ----------------------------------------------------------------------------- tokenizer


def llama_cpp_pre(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's name for the way this byte-level BPE tokenizer splits text before merging."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    merges = tokenizer_json.get("model", {}).get("merges") or []
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = steps[0].get("pattern", {}).get("Regex")
        if regex in SPLIT_PRE:
            return SPLIT_PRE[regex]
    if kinds == ["ByteLevel"] and not merges:
        return "gpt-2"  # no merges: every byte is its own token, so how the text is split cannot matter
    raise ShearError(f"tokenizer: pre-tokenizer {kinds} has no llama.cpp equivalent known to the GGUF writer")


def tokenizer_metadata(tokenizer, vocab_size: int) -> dict[str, Any]:
    """The GGUF `tokenizer.*` fields of a HF byte-level BPE tokenizer (vocab padded to the model's rows)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ShearError("tokenizer: GGUF export needs a fast (tokenizers) tokenizer")
    spec = json.loads(backend.to_str())
    if spec.get("model", {}).get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise ShearError("tokenizer: GGUF export supports byte-level BPE tokenizers (gpt2 style) only")
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size:
        raise ShearError(f"tokenizer: {len(vocab)} tokens but the model has {vocab_size} embedding rows")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [5] * vocab_size  # UNUSED unless the vocabulary fills the row
    for token, i in vocab.items():
        tokens[i], types[i] = token, 1  # NORMAL
    for i, added in backend.get_added_tokens_decoder().items():
        types[i] = 3 if added.special else 4  # CONTROL | USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges") or []]
    probe, bare = (tokenizer("a", add_special_tokens=special)["input_ids"] for special in (True, False))
    meta: dict[str, Any] = {
        "model": "gpt2", "pre": llama_cpp_pre(spec), "tokens": tokens, "token_type": types, "merges": merges,
        "add_bos": tokenizer_adds_bos(tokenizer),
        "add_eos": bool(tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id] != bare[-1:]),
        "chat_template": tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None,
    }
    for name in ("bos", "eos", "pad", "unk"):
        meta[f"{name}_id"] = getattr(tokenizer, f"{name}_token_id", None)
    return meta


# ----------------------------------------------------------------------------- writer


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    """Nested shear.json facts -> flat `shear.a.b` keys; lists that are not all numbers or all strings become JSON."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(f"{prefix}.{k}", v))
        return out
    if isinstance(value, list) and not (value and (all(isinstance(v, str) for v in value)
                                                   or all(isinstance(v, int) and not isinstance(v, bool) for v in value))):
        return {prefix: json.dumps(value)}
    return {} if value is None else {prefix: value}


def add_value(writer, key: str, value: Any) -> None:
    """Write one metadata value with the GGUF type its Python type calls for."""
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_int64(key, value) if abs(value) >= 2**31 else writer.add_int32(key, value)
    elif isinstance(value, float):
        writer.add_float64(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, list):
        writer.add_array(key, value)


def gguf_tensors(model, where: str) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) for every weight, Q/K permuted to llama.cpp's RoPE layout."""
    config = model.config
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    state = {k: v.detach().to(torch.float32).cpu().numpy() for k, v in model.state_dict().items()}
    out = []
    for name, array in state.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if name in TOP_TENSORS:
            out.append((TOP_TENSORS[name], array))
            continue
        parts = name.split(".")  # model.layers.<i>.<suffix>
        suffix = ".".join(parts[3:])
        if parts[:2] != ["model", "layers"] or suffix not in BLOCK_TENSORS:
            raise ShearError(f"{where}: tensor {name!r} has no place in a llama GGUF file")
        if suffix.startswith("self_attn.q_proj"):
            array = permute_rope(array, n_head)
        elif suffix.startswith("self_attn.k_proj"):
            array = permute_rope(array, n_kv)
        out.append((f"blk.{parts[2]}.{BLOCK_TENSORS[suffix]}", array))
    rope = rope_parameters(config)
    if rope["rope_type"] == "llama3":
        out.append(("rope_freqs.weight", llama3_rope_factors(rope, head_dim(config))))
    return out


def gguf_writer(arch: str):
    """A GGUFWriter (file opened later) that can also write an empty array, which the format allows
    but the writer refuses: a vocabulary without merges (a byte tokenizer) still needs llama.cpp's
    required `tokenizer.ggml.merges` key."""
    import gguf

    class Writer(gguf.GGUFWriter):
        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            if vtype == gguf.GGUFValueType.ARRAY and len(val) == 0:
                head = self._pack("I", vtype) if add_vtype else b""
                return head + self._pack("I", sub_type or gguf.GGUFValueType.STRING) + self._pack("Q", 0)
            return super()._pack_val(val, vtype, add_vtype, sub_type)

    return Writer(None, arch)


def export_gguf(model, tokenizer, path: str | Path, fmt: str, record: dict[str, Any] | None = None,
                name: str = "shear") -> dict[str, Any]:
    """Write `model` + `tokenizer` as one GGUF file in format `fmt`, atomically.

    `record` is the checkpoint's shear.json, written as `shear.*` metadata. Returns what was
    written: path, format, size in bytes, tensor count and the tensors kept in f16 because
    their rows do not divide into the format's blocks.
    """
    import gguf

    check_format(fmt, "export format")
    config = model.config
    arch = check_exportable(config, str(path))
    qtype = gguf.GGMLQuantizationType[fmt.upper()]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    tok = tokenizer_metadata(tokenizer, config.vocab_size)  # validates before any file exists
    tensors = gguf_tensors(model, str(path))
    rope = rope_parameters(config)
    hd = head_dim(config)

    writer = gguf_writer(arch)
    writer.add_name(name)
    writer.add_type("model")
    writer.add_file_type(gguf.LlamaFileType[f"MOSTLY_{fmt.upper()}"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(hd)
    writer.add_value_length(hd)
    writer.add_rope_dimension_count(hd)  # llama.cpp requires n_rot == head length for llama; transformers reads head_dim here
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))

    writer.add_tokenizer_model(tok["model"])
    writer.add_tokenizer_pre(tok["pre"])
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["token_type"])
    writer.add_key_value(gguf.Keys.Tokenizer.MERGES, tok["merges"], gguf.GGUFValueType.ARRAY,
                         sub_type=gguf.GGUFValueType.STRING)
    for key in ("bos", "eos", "pad"):
        if tok[f"{key}_id"] is not None:
            getattr(writer, f"add_{key}_token_id")(tok[f"{key}_id"])
    if tok["unk_id"] is not None:
        writer.add_unk_token_id(tok["unk_id"])
    writer.add_add_bos_token(tok["add_bos"])
    writer.add_add_eos_token(tok["add_eos"])
    if tok["chat_template"]:
        writer.add_chat_template(tok["chat_template"])

    fallback = []
    for tname, array in tensors:
        if array.ndim == 1:
            writer.add_tensor(tname, array.astype(np.float32))
        elif array.shape[-1] % block:
            fallback.append(tname)
            writer.add_tensor(tname, array.astype(np.float16))
        elif fmt == "f16":
            writer.add_tensor(tname, array.astype(np.float16))
        else:
            writer.add_tensor(tname, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    facts = flatten("shear", record or {})
    facts.update({"shear.export.format": fmt, "shear.export.f16_fallback": fallback})
    for key, value in facts.items():
        add_value(writer, key, value)

    with atomic_file(path, "wb") as f:
        writer.fout = [f]
        writer.state = gguf.gguf_writer.WriterState.EMPTY  # header write then uses this open file
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        f.flush()
        writer.fout = None
    return {"path": str(path), "format": fmt, "bytes": Path(path).stat().st_size,
            "tensors": len(tensors), "f16_fallback": fallback}


# ----------------------------------------------------------------------------- readers


def read_gguf(path: str | Path):
    """The model of a GGUF file as transformers' GGUF loader reads it back (float32, eval mode).

    Dequantizing and converting the tokenizer cost ~15-20 s of CPU at 135M parameters: a
    caller checking one file in several ways reads it once and passes it on.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def reread_logits_error(model, path: str | Path, rows: torch.Tensor, reference=None, reread=None) -> float:
    """||logits(file read by transformers' GGUF loader) - logits(reference)|| / ||logits(reference)||
    (Frobenius norms over every position and vocabulary entry).

    `reference` defaults to `model`; pass a model whose weights are the format's dequantized
    weights to check that the file loses nothing beyond the quantization itself. `reread`:
    the file already read by `read_gguf` (else it is read here).
    """
    reread = read_gguf(path) if reread is None else reread
    with torch.no_grad():
        want = (model if reference is None else reference)(rows).logits
        got = reread(rows).logits
    return float((got - want).norm() / want.norm())


def quantized_copy(model, fmt: str):
    """A copy of `model` whose weights went through `fmt`'s quantizer and back, as in the exported file
    (2-D weights whose rows divide into blocks; 1-D tensors stay float32, the rest f16)."""
    import copy

    import gguf

    qtype = gguf.GGMLQuantizationType[fmt.upper()]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            w = p.detach().cpu().numpy().astype(np.float32)
            if w.ndim == 1:
                continue
            if w.shape[-1] % block or fmt == "f16":
                back = w.astype(np.float16).astype(np.float32)
            else:
                back = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)
            p.copy_(torch.from_numpy(back.reshape(w.shape)))
    return out


def open_llama_cpp(path: str | Path, threads: int = 1, n_ctx: int = 512, logits_all: bool = False):
    """A llama.cpp context on a GGUF file (llama-cpp-python, CPU), or one ShearError line when it is not installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise ShearError("llama-cpp-python is not installed; run `make setup-python` (it builds llama.cpp for the CPU)") from None
    return Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                 n_batch=n_ctx, logits_all=logits_all, verbose=False)


def llama_cpp_greedy(llm, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy continuation of `prompt` by llama.cpp (argmax of each step's logits)."""
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(new_tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def llama_cpp_perplexity(llm, rows: np.ndarray, bos_token_id: int | None = None) -> dict:
    """llama.cpp's perplexity over `rows` [N, L] with the pipeline's protocol (shear/evaluate.py):
    each row independent, next-token NLL over tokens 2..L (1..L with a prepended BOS)."""
    nll, count = 0.0, 0
    for row in rows:
        ids = ([bos_token_id] if bos_token_id is not None else []) + [int(t) for t in row]
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        nll -= float(logp[np.arange(len(ids) - 1), ids[1:]].sum())
        count += len(ids) - 1
    return {"loss": nll / count, "ppl": math.exp(nll / count), "tokens": count}


def llama_cpp_speed_runs(llm, prompt_tokens: int, new_tokens: int, repeats: int, vocab: int) -> list[tuple[float, float]]:
    """`repeats` batch-1 runs of llama.cpp: (prompt tokens/s, decode tokens/s) each.

    A fixed pseudo-random prompt (token ids do not change the speed); decode is greedy, one
    token per llama.cpp call, the way a chat client generates.
    """
    import time

    prompt = [int(t) for t in np.random.default_rng(0).integers(0, vocab, prompt_tokens)]
    llama_cpp_greedy(llm, prompt[:8], 2)  # warm-up: first-call allocations
    runs = []
    for _ in range(repeats):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        for _ in range(new_tokens):
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        runs.append((prompt_tokens / (t1 - t0), new_tokens / (time.perf_counter() - t1)))
    return runs


def speed_summary(runs: list[tuple[float, float]]) -> dict:
    """Median and spread (min, max) of prompt and decode tokens/s over runs."""
    out = {}
    for kind, values in (("prompt", [r[0] for r in runs]), ("decode", [r[1] for r in runs])):
        out[f"{kind}_tokens_per_s"] = float(np.median(values))
        out[f"{kind}_tokens_per_s_min"] = float(min(values))
        out[f"{kind}_tokens_per_s_max"] = float(max(values))
    return out


def check_file(path: str | Path, pipeline_ppl: float, reread, rows: torch.Tensor, bos_token_id: int | None,
               threads: int, greedy_prompt: list[int], new_tokens: int) -> dict:
    """llama.cpp against the pipeline on one exported file: perplexity on `rows` next to the
    pipeline's `pipeline_ppl` (the checkpoint in float32, shear.evaluate.perplexity, same rows and
    BOS: one figure per checkpoint, whatever the format), and the greedy continuation of
    `greedy_prompt` next to transformers' on the same file's weights (`reread`, from `read_gguf`)."""
    path = Path(path)
    llm = open_llama_cpp(path, threads=threads, n_ctx=max(rows.shape[1] + 1, len(greedy_prompt) + new_tokens + 8),
                         logits_all=True)
    theirs = llama_cpp_perplexity(llm, rows.numpy(), bos_token_id)
    want = reread.generate(torch.tensor([greedy_prompt]), max_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=0)[0, len(greedy_prompt):].tolist()
    got = llama_cpp_greedy(llm, greedy_prompt, new_tokens)
    llm.close()
    return {
        "ppl_llama_cpp": theirs["ppl"], "ppl_pipeline": pipeline_ppl,
        "ppl_rel_diff": theirs["ppl"] / pipeline_ppl - 1, "ppl_tokens": theirs["tokens"],
        "greedy_agree_tokens": next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), len(want)),
        "greedy_tokens": len(want),
    }
