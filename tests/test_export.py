"""GGUF export, checked by readers nobody here wrote: transformers' GGUF loader and llama.cpp."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from shear.errors import ShearError
from shear.export import FORMATS, export_gguf, quantized_copy, reread_logits_error
from shear.importance.width import width_magnitude_scores
from shear.models import make_tiny_model
from shear.prune.width import width_prune
from tests.conftest import stdlib_texts

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed (`make setup-python` builds it)")
SAMPLE = "def main():\n    print('Hello, world!')  # 42 <|endoftext|> résumé 2026\n"


def bpe_tokenizer():
    """A byte-level BPE tokenizer with real merges, trained on standard-library text (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(stdlib_texts(5), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")


def widen_weights(model, seed=0):
    """Larger weights than the default init, so a wrong permutation or layout changes the logits a lot."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(0.5 + torch.rand(p.shape, generator=g) if "norm" in name else p * 4.0)
    return model


@pytest.fixture(scope="module")
def tiny_bpe():
    """A random tiny LLaMA whose vocabulary is a trained BPE tokenizer's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = bpe_tokenizer()
    config = LlamaConfig(vocab_size=len(tok) + 8, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                         rope_theta=50000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    return widen_weights(LlamaForCausalLM(config).eval()), tok


def rows(vocab: int, n: int = 2, length: int = 24) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(1))


def test_f16_round_trip_equals_checkpoint(tmp_path, tiny):
    model, tok = tiny
    info = export_gguf(model, tok, tmp_path / "m-f16.gguf", "f16", {"method": "base", "parameters": {"total": 1}})
    assert info["f16_fallback"] == [] and info["bytes"] > 0
    assert reread_logits_error(model, tmp_path / "m-f16.gguf", rows(model.config.vocab_size)) < 1e-3


@pytest.mark.parametrize("fmt", ["q8_0", "q4_1", "bf16"])
def test_quantized_round_trip_is_the_quantizer_and_nothing_else(tmp_path, tiny_bpe, fmt):
    """The re-read model equals the checkpoint with its weights passed through the format's quantizer;
    q8_0 also stays within its rounding error of the float checkpoint (see the bound below)."""
    model, tok = tiny_bpe
    path = tmp_path / f"m-{fmt}.gguf"
    export_gguf(model, tok, path, fmt)
    x = rows(model.config.vocab_size)
    assert reread_logits_error(model, path, x, reference=quantized_copy(model, fmt)) < 1e-3
    if fmt == "q8_0":
        # Q8_0 rounds each weight to a step of max|block of 32| / 127: a relative RMS error of
        # ~(2.5 sigma / 127) / sqrt(12) / sigma ~ 0.6% per matrix for Gaussian-like rows. Independent
        # errors of the matrices one token passes through add in quadrature.
        matrices = 1 + 7 * model.config.num_hidden_layers + 1
        assert reread_logits_error(model, path, x) < 0.006 * matrices ** 0.5 * 3


def test_width_pruned_model_with_explicit_head_dim_round_trips(tmp_path):
    model, tok = widen_weights(make_tiny_model("layers=3,hidden=96,heads=6,kv_heads=2,mlp=64")[0]), make_tiny_model()[1]
    target = {"num_hidden_layers": 3, "hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1,
              "intermediate_size": 40, "head_dim": 16}
    pruned, _ = width_prune(model, target, width_magnitude_scores(model))
    assert pruned.config.head_dim * pruned.config.num_attention_heads != pruned.config.hidden_size
    path = tmp_path / "w-q8_0.gguf"
    info = export_gguf(pruned, tok, path, "q8_0")
    # ffn_down's rows are 40 long: not a whole number of 32-blocks, so they stay f16 and the file says so
    assert info["f16_fallback"] == [f"blk.{i}.ffn_down.weight" for i in range(3)]
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    assert fields["llama.attention.key_length"].contents() == 16
    assert list(fields["shear.export.f16_fallback"].contents()) == info["f16_fallback"]
    x = rows(pruned.config.vocab_size)
    assert reread_logits_error(pruned, path, x, reference=quantized_copy(pruned, "q8_0")) < 1e-3
    export_gguf(pruned, tok, tmp_path / "w-f16.gguf", "f16")
    assert reread_logits_error(pruned, tmp_path / "w-f16.gguf", x, reference=quantized_copy(pruned, "f16")) < 1e-4


def test_tokenizer_in_file_encodes_the_same_ids(tmp_path, tiny_bpe):
    from transformers import AutoTokenizer

    model, tok = tiny_bpe
    export_gguf(model, tok, tmp_path / "t-f16.gguf", "f16", {"method": "base"})
    reread = AutoTokenizer.from_pretrained(tmp_path, gguf_file="t-f16.gguf")
    want = tok(SAMPLE)["input_ids"]
    assert len(want) < len(SAMPLE.encode())  # the merges are used
    assert reread(SAMPLE)["input_ids"] == want
    from gguf import GGUFReader

    fields = GGUFReader(tmp_path / "t-f16.gguf").fields
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tok.eos_token_id
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False
    assert fields["shear.method"].contents() == "base"
    assert fields["tokenizer.ggml.tokens"].contents()[-1] == f"[PAD{model.config.vocab_size - 1}]"


def test_refused_architecture_gives_one_line_and_no_file(tmp_path, tiny):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300))
    with pytest.raises(ShearError) as e:
        export_gguf(gpt2, tiny[1], tmp_path / "g.gguf", "f16")
    assert "\n" not in str(e.value) and "gpt2" in str(e.value) and "llama" in str(e.value)
    with pytest.raises(ShearError, match="q3_k"):
        export_gguf(tiny[0], tiny[1], tmp_path / "g.gguf", "q3_k")
    assert list(tmp_path.iterdir()) == []
    assert "q8_0" in FORMATS


@needs_llama_cpp
def test_llama_cpp_runs_the_file_like_transformers(tmp_path, tiny_bpe):
    """llama.cpp tokenizes like the checkpoint, its logits match, and its greedy continuation is ours."""
    from shear.evaluate import perplexity
    from shear.export import llama_cpp_greedy, llama_cpp_perplexity, open_llama_cpp

    model, tok = tiny_bpe
    path = tmp_path / "l-f16.gguf"
    export_gguf(model, tok, path, "f16")
    llm = open_llama_cpp(path, threads=1, n_ctx=128, logits_all=True)
    assert llm.tokenize(SAMPLE.encode(), add_bos=False, special=True) == tok(SAMPLE)["input_ids"]
    prompt = tok("def main():\n    return")["input_ids"]
    ours = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert llama_cpp_greedy(llm, prompt, 8) == ours[0, len(prompt):].tolist()
    x = rows(len(tok), n=3, length=32)
    theirs = llama_cpp_perplexity(llm, x.numpy())
    mine = perplexity(model, x, batch_size=3)
    assert abs(theirs["ppl"] / mine["ppl"] - 1) < 0.01
    assert np.isfinite(theirs["loss"])


def test_export_stage_writes_files_and_metrics(tmp_path, monkeypatch, tiny, shards):
    """The stage on tiny base + retrained checkpoints: the files of export.models only, metrics for
    base and each exported model in each format (llama.cpp figures when llama.cpp is installed)."""
    import shutil

    from shear.config import parse_params
    from shear.io import read_json
    from shear.models import save_model
    from shear.prune.depth import remove_blocks
    from stages import export

    model, tok = tiny
    monkeypatch.chdir(tmp_path)
    shutil.copytree(shards, "data/shards")
    save_model(model, tok, "data/models/base", {"method": "base", "source": "tiny:"})
    save_model(remove_blocks(model, [1]), tok, "data/models/retrained", {"method": "depth", "removed_blocks": [1]})
    params = parse_params({"export": {"formats": ["f16", "q4_0"], "ppl_seq_len": 32, "ppl_sequences": 4,
                                      "speed": {"prompt_tokens": 16, "new_tokens": 4, "repeats": 1,
                                                "greedy_prompt_tokens": 8}}})
    export.main(params, None)
    assert sorted(p.name for p in (tmp_path / "data/export").iterdir()) == ["retrained-f16.gguf", "retrained-q4_0.gguf"]
    metrics = read_json("reports/export/metrics.json")
    assert metrics["retrained"]["ideal_speedup"] == pytest.approx(4 / 3, rel=0.01)
    assert metrics["retrained"]["f16"]["reread_logits_rel_error"] < 1e-3
    assert metrics["base"]["q4_0"]["file_bytes"] > metrics["retrained"]["q4_0"]["file_bytes"]
    if HAS_LLAMA_CPP:
        row = metrics["retrained"]["f16"]
        assert abs(row["ppl_rel_diff"]) < 0.01 and row["decode_tokens_per_s"] > 0 and row["decode_speedup"] > 0
