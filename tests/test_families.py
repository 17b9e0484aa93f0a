"""The family matrix: every accepted architecture through depth, width (explicit shape and budget)
and sheared pruning, each output checked against a reference.

Tiny random-weight configs built by transformers itself, with biases and norm weights made
non-trivial (transformers initialises biases to 0 and norms to identity, which would hide
mistakes). For every (family, method) the output must: have the target shape; count exactly
the parameters the planner predicts (`shape_parameters`, biases and norms included) and
shear.json records; compute what the reference computes (depth and width: the unpruned model
with the removed units zeroed, biases kept except a removed hidden channel's own entries;
sheared: the masked model); generate the same greedy tokens with and without the KV cache;
and load with the same class in a fresh process (one subprocess for the whole matrix), with
the same logits. Run with -s to see the matrix's numbers.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from shear.importance.width import width_scores
from shear.mixture import DomainSampler
from shear.models import (
    architecture,
    byte_tokenizer,
    check_supported,
    count_parameters,
    layout,
    load_model,
    residual_writers,
    save_model,
)
from shear.prune.depth import remove_blocks
from shear.prune.l0 import L0Masks
from shear.prune.shapes import resolve_target, shape_parameters, source_shape
from shear.prune.sheared import MaskHooks, finalize, prune_sheared
from shear.prune.width import choose_units, width_prune
from shear.trainer import make_accelerator, plan_run

TOKENIZER = byte_tokenizer()
SHAPE = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, bos_token_id=TOKENIZER.bos_token_id,
             eos_token_id=TOKENIZER.eos_token_id, pad_token_id=TOKENIZER.pad_token_id)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
QWEN_ROPE = {"rope_type": "default", "rope_theta": 1000000.0}  # Qwen2/3's own theta, not the class default
GEMMA3_ROPE = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},  # as Gemma 3 4B+
               "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
FAMILIES = {
    "llama3": lambda: LlamaConfig(**SHAPE, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=False),
    "qwen2": lambda: Qwen2Config(**SHAPE, rope_parameters=QWEN_ROPE, tie_word_embeddings=True),
    "qwen3": lambda: Qwen3Config(**SHAPE, rope_parameters=QWEN_ROPE, head_dim=16),
    "mistral": lambda: MistralConfig(**SHAPE, sliding_window=8),
    "gemma3": lambda: Gemma3TextConfig(
        **SHAPE, head_dim=16, sliding_window=8, query_pre_attn_scalar=24, final_logit_softcapping=30.0,
        rope_parameters=GEMMA3_ROPE,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"]),
    "llama_bias": lambda: LlamaConfig(**SHAPE, attention_bias=True, mlp_bias=True),
    "llama_head_dim": lambda: LlamaConfig(**SHAPE, head_dim=24),  # 4 heads x 24 != hidden 64
}
EXPLICIT = {"num_hidden_layers": 3, "hidden_size": 48, "num_attention_heads": 2, "num_key_value_heads": 1,
            "intermediate_size": 64}
IDS = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))  # longer than the windows
METHODS = ("depth", "width_explicit", "width_budget", "sheared")
TOLERANCE = 1e-4


def make_model(family: str):
    """A tiny random model of `family` with random biases and norm weights."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(FAMILIES[family]()).eval()
    unit_offset = layout(model.config)["unit_offset_norm"]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.rand(p.shape, generator=g)
            if name.endswith("bias"):
                p.copy_(noise - 0.5)
            elif "norm" in name:
                p.copy_(noise - 0.5 if unit_offset else noise + 0.5)
            else:
                p.mul_(3.0)
    return model


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def zero_block(layer) -> None:
    """A block whose two residual writers output zero is the identity."""
    for proj, _ in residual_writers(layer):
        proj.weight.zero_()
        if proj.bias is not None:
            proj.bias.zero_()


@torch.no_grad()
def zeroed(model, keep: dict):
    """The unpruned model with every unit not in `keep` zeroed (see shear/prune/width.py); biases
    stay, except a removed hidden channel's own o_proj/down_proj bias entries (part of the channel)."""
    m = copy.deepcopy(model)
    c = m.config
    hd, group = source_shape(c)["head_dim"], c.num_attention_heads // c.num_key_value_heads
    layers = keep["layers"]
    for i, layer in enumerate(m.model.layers):
        if i not in layers:
            zero_block(layer)
            continue
        j = layers.index(i)
        kept = set(keep["heads"][j]) & {h for h in range(c.num_attention_heads) if h // group in keep["kv_heads"][j]}
        for h in set(range(c.num_attention_heads)) - kept:
            layer.self_attn.o_proj.weight[:, h * hd:(h + 1) * hd] = 0
        drop = sorted(set(range(c.intermediate_size)) - set(keep["mlp"][j]))
        layer.mlp.down_proj.weight[:, drop] = 0
    if keep["hidden"] is not None:
        drop = sorted(set(range(c.hidden_size)) - set(keep["hidden"]))
        m.get_input_embeddings().weight[:, drop] = 0
        for layer in m.model.layers:
            for proj, _ in residual_writers(layer):
                proj.weight[drop] = 0
                if proj.bias is not None:
                    proj.bias[drop] = 0
    return m


def random_masks(model, target: dict) -> L0Masks:
    """L0 masks with spread-out log-alphas, so the exact masks are soft values, not all ~1."""
    source = architecture(model.config)
    masks = L0Masks(source, {**source, **target}, seed=0, layout=layout(model.config))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in masks.masks.values():
            m.log_alpha.copy_(torch.randn(m.log_alpha.shape, generator=g) * 3)
    masks.constrain()
    return masks


def masked_logits(model, masks, z) -> torch.Tensor:
    hooks = MaskHooks(model, masks)
    hooks.set(z)
    try:
        return logits(model)
    finally:
        hooks.remove()


def run_case(family: str, method: str, out_dir) -> dict:
    """Prune one family by one method; returns the numbers the tests check."""
    model = make_model(family)
    source = source_shape(model.config)
    facts = layout(model.config)
    tied = bool(model.config.tie_word_embeddings)
    if method == "depth":
        keep = {"layers": [0, 2, 3], "heads": [list(range(4))] * 3, "kv_heads": [[0, 1]] * 3,
                "mlp": [list(range(96))] * 3, "hidden": None}
        reference = logits(zeroed(model, keep))
        pruned = remove_blocks(copy.deepcopy(model), [1])
        target = {**source, "num_hidden_layers": 3}
        record = {"method": "depth", "removed_blocks": [1]}
    elif method.startswith("width"):
        wanted = EXPLICIT if method == "width_explicit" else \
            {"params": int(0.6 * shape_parameters(source, 0, True, facts)["non_embedding"])}
        target = resolve_target(model.config, wanted, align=8, tp_divisible=8)
        # the two data-driven criteria, so their hooks and gradients run on every family
        scores = width_scores(model, IDS, "taylor" if method == "width_explicit" else "activation", batch_size=2)
        keep = choose_units(scores, source, target)
        reference = logits(zeroed(model, keep))
        pruned, record = width_prune(copy.deepcopy(model), target, scores)
    else:  # sheared: a short training run must reach the target; exact masks folded and cut == masked
        target = {**source, **EXPLICIT}
        rows = np.random.default_rng(0).integers(0, 256, 4 * 16 * 8).astype(np.uint16)
        sampler = DomainSampler({"random": rows}, seq_len=16, seed=0)
        train_masks = L0Masks(source, target, temperature=2 / 3, seed=0, layout=facts)
        plan = plan_run("prune.sheared", 2 * 2 * 16, 2, 16, 1, 1, 0.0)
        trained, run = prune_sheared(
            copy.deepcopy(model), train_masks, sampler, plan, make_accelerator("cpu"), lr_model=1e-3, lr_mask=1.0,
            lr_lambda=1.0, lagrangian_warmup_fraction=0.0, checkpoint_every=10,
            checkpoint_dir=out_dir / "ckpt", fingerprint=family)
        assert np.isfinite(run["training"]["final"]["lm_loss"]) and source_shape(trained.config) == target
        masks = random_masks(model, EXPLICIT)
        z = masks.deterministic(exact=True)
        reference = masked_logits(model, masks, z)
        pruned, keep, _ = finalize(copy.deepcopy(model), masks)
        record = {"method": "sheared", "kept": keep}
        l0_count = masks.parameters_kept({k: (v != 0).float() for k, v in z.items()}).item()
    info = save_model(pruned, TOKENIZER, out_dir / "model", record)
    loaded, _, _ = load_model(out_dir / "model")  # the project's loader: the family is accepted
    got = logits(loaded)
    prompt = IDS[:1, :6]
    with torch.no_grad():
        cached = loaded.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = loaded.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=False, pad_token_id=0)
    torch.save(got, out_dir / "logits.pt")
    return {
        "class": type(model).__name__,
        "max_diff": (got - reference).abs().max().item(),
        "removed_mattered": (logits(model) - reference).abs().max().item(),
        "shape": source_shape(loaded.config),
        "target": {k: target[k] for k in source},
        "counted": count_parameters(loaded),
        "predicted": shape_parameters(target, loaded.config.vocab_size, tied, facts),
        "l0_count": l0_count if method == "sheared" else None,
        "recorded": info["parameters"],
        "written": json.loads((out_dir / "model" / "shear.json").read_text())["parameters"],
        "cache_equal": torch.equal(cached, uncached),
        "budget": wanted.get("params") if method == "width_budget" else None,
        "tensor_parallel": info["tensor_parallel"],
        "dir": str(out_dir / "model"),
    }


FRESH = """
import json, sys, torch
from transformers import AutoModelForCausalLM
out = {}
for name, (path, ids) in json.loads(sys.argv[1]).items():
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(torch.tensor(ids)).logits
    want = torch.load(path + "/../logits.pt")
    out[name] = [type(model).__name__, (got - want).abs().max().item()]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    """Every (family, method) case, then one fresh process that loads every output."""
    root = tmp_path_factory.mktemp("families")
    results = {}
    for family in FAMILIES:
        for method in METHODS:
            out = root / family / method
            out.mkdir(parents=True)
            try:
                results[family, method] = run_case(family, method, out)
            except Exception as e:  # reported by the case's own test
                results[family, method] = e
    done = {f"{f}/{m}": (r["dir"], IDS.tolist()) for (f, m), r in results.items() if isinstance(r, dict)}
    proc = subprocess.run([sys.executable, "-c", FRESH, json.dumps(done)], capture_output=True, text=True,
                          timeout=300)
    fresh = json.loads(proc.stdout.splitlines()[-1]) if proc.returncode == 0 else {}
    print(f"\n{'family':15} {'method':15} {'max|diff|':>9} {'vs full':>8} {'fresh':>9} {'non-emb':>8} {'predicted':>9} "
          f"{'budget':>7} tp cache shape")
    for (f, m), r in results.items():
        if isinstance(r, dict):
            r["fresh"] = fresh.get(f"{f}/{m}")
            print(f"{f:15} {m:15} {r['max_diff']:9.2e} {r['removed_mattered']:8.2f} "
                  f"{r['fresh'][1] if r['fresh'] else float('nan'):9.2e} "
                  f"{r['counted']['non_embedding']:8} {r['predicted']['non_embedding']:9} {r['budget'] or '':>7} "
                  f"{r['tensor_parallel']:2} {str(r['cache_equal']):5} {list(r['shape'].values())}")
        else:
            print(f"{f:15} {m:15} FAILED: {r!r}")
    return {"results": results, "fresh_stderr": proc.stderr[-2000:]}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_matrix(matrix, family, method):
    r = matrix["results"][family, method]
    if isinstance(r, Exception):
        raise r
    assert r["removed_mattered"] > 1e-2  # the reference differs from the unpruned model
    assert r["max_diff"] < TOLERANCE, r["max_diff"]
    assert r["shape"] == r["target"]
    assert r["counted"] == r["predicted"] == r["recorded"] == r["written"]
    if r["l0_count"] is not None:  # the L0 masks' exact count of the units they keep
        assert r["l0_count"] == r["counted"]["non_embedding"]
    if r["budget"] is not None:
        assert 0.9 * r["budget"] <= r["counted"]["non_embedding"] <= r["budget"]
    assert r["cache_equal"]
    assert r["fresh"] is not None, matrix["fresh_stderr"]
    assert r["fresh"][0] == r["class"] and r["fresh"][1] < 1e-6


def test_fused_projections_are_refused():
    from transformers import Phi3Config

    from shear.errors import ShearError

    config = Phi3Config(**SHAPE)
    config.architectures = ["Phi3ForCausalLM"]
    with pytest.raises(ShearError, match=r"model type 'phi3' \(Phi3ForCausalLM\) is not LlamaForCausalLM-compatible"):
        check_supported(config, "some/dir")


@pytest.mark.parametrize("family", ["gemma3", "qwen2"])
def test_perplexity_and_block_scores_use_the_models_own_logits(family):
    """Evaluation and block scoring run the LM head themselves: Gemma's final soft-capping included."""
    from shear.evaluate import perplexity
    from shear.importance.blocks import _suffix_nll

    model = make_model(family)
    if family == "gemma3":
        model.config.final_logit_softcapping = 2.0  # a cap that bites on random logits
    with torch.no_grad():
        loss = model(IDS, labels=IDS).loss.item()
        assert perplexity(model, IDS, batch_size=2)["loss"] == pytest.approx(loss, rel=1e-5)
        embedded = model.get_input_embeddings()(IDS)
        assert _suffix_nll(model, embedded, 0, IDS).sum().item() / IDS[:, 1:].numel() == pytest.approx(loss, rel=1e-5)
