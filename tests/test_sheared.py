"""Sheared pruning: masked forward, folding + slicing, training, resume, export (one process;
several processes, DDP and FSDP: tests/test_sheared_fsdp.py)."""
import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from shear.data import load_domains
from shear.mixture import DomainSampler, build_sampler, heldout_rows
from shear.models import architecture, count_parameters, make_tiny_model, save_model
from shear.prune.depth import remove_blocks
from shear.prune.l0 import L0Masks
from shear.prune.sheared import MaskHooks, finalize, prune_sheared, train_masks
from shear.trainer import make_accelerator, open_live, plan_run, read_checkpoint

SPEC = "layers=4,hidden=64,heads=4,kv_heads=2,mlp=128"
TRAIN = dict(lr_model=1e-4, lr_mask=1.0, lr_lambda=1.0, lagrangian_warmup_fraction=0.0, checkpoint_every=2)


@pytest.fixture(scope="module")
def accelerator():
    return make_accelerator("cpu")


def plan(steps, batch_size=2, grad_accum=1, lr_warmup_fraction=0.1):
    return plan_run("prune.sheared", steps * batch_size * 32 * grad_accum, batch_size, 32, grad_accum, 1,
                    lr_warmup_fraction)


def train(model, masks, sampler, accelerator, steps, checkpoint_dir, log_dir, fingerprint="test", **extra):
    """train_masks as the stage calls it: resume from `checkpoint_dir` when it holds this run."""
    resume = read_checkpoint(checkpoint_dir, fingerprint, "sheared")
    live = open_live(log_dir, resume["step"] if resume else None)
    try:
        return train_masks(model, masks, sampler, plan(steps), accelerator, checkpoint_dir=checkpoint_dir,
                           fingerprint=fingerprint, live=live, resume=resume, **{**TRAIN, **extra})
    finally:
        live.end()



def random_masks(model, seed=0, **changes):
    source = architecture(model.config)
    masks = L0Masks(source, {**source, **changes}, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in masks.masks.values():
            m.log_alpha.copy_(torch.randn(m.log_alpha.shape, generator=g) * 3)
    masks.constrain()
    return masks


def masked_logits(model, masks, z, ids):
    hooks = MaskHooks(model, masks)
    hooks.set(z)
    with torch.no_grad():
        out = model(ids).logits
    hooks.remove()
    return out


@pytest.mark.parametrize("spec,changes", [
    (SPEC, dict(num_hidden_layers=3, hidden_size=48, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=96)),
    (SPEC, dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
                intermediate_size=40)),
    (SPEC + ",tied=0", dict(hidden_size=48, num_attention_heads=2, num_key_value_heads=1)),  # untied LM head
])
def test_exported_model_equals_masked_model(tmp_path, spec, changes):
    model, tok = make_tiny_model(spec, seed=0)
    masks = random_masks(model, **changes)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    z = masks.deterministic(exact=True)
    expected = masked_logits(model, masks, z, ids)

    pruned, keep, _ = finalize(copy.deepcopy(model), masks)
    save_model(pruned, tok, tmp_path / "pruned", {"method": "sheared", "kept": keep})
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", dtype=torch.float32).eval()
    with torch.no_grad():
        got = loaded(ids).logits
    assert (got - expected).abs().max().item() < 1e-4
    source = architecture(model.config)
    assert {k: getattr(loaded.config, k) for k in masks.target} == {k: changes.get(k, source[k]) for k in masks.target}
    assert count_parameters(loaded)["non_embedding"] == \
        masks.parameters_kept({k: (v != 0).float() for k, v in z.items()}).item()
    out = loaded.generate(ids[:1, :8], max_new_tokens=4, do_sample=False, use_cache=True)
    assert out.shape == (1, 12)


def test_zero_layer_mask_removes_the_layer():
    model, _ = make_tiny_model(SPEC, seed=0)
    source = architecture(model.config)
    masks = L0Masks(source, {**source, "num_hidden_layers": 3})
    z = {name: torch.ones_like(m.log_alpha) for name, m in masks.masks.items()}
    z["layer"][2] = 0.0
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    masked = masked_logits(model, masks, z, ids)
    shorter = remove_blocks(copy.deepcopy(model), [2])
    with torch.no_grad():
        assert (shorter(ids).logits - masked).abs().max().item() < 1e-5
    with torch.no_grad():
        masks.masks["layer"].log_alpha[2] = -4.0  # the lowest layer score: finalisation drops it
    _, keep, _ = finalize(copy.deepcopy(model), masks)
    assert keep["layers"] == [0, 1, 3]


def test_expected_sparsity_moves_toward_target(tmp_path, shards, accelerator):
    model, _ = make_tiny_model(SPEC, seed=0)
    source = architecture(model.config)
    masks = L0Masks(source, {**source, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2})
    masks.constrain()
    before = {k: m.expected_sparsity().mean().item() for k, m in masks.masks.items()}
    sampler = DomainSampler(load_domains(shards, "train"), seq_len=32, seed=0)
    last = train(model, masks, sampler, accelerator, 8, tmp_path / "ckpt", tmp_path / "logs").last
    after = {k: m.expected_sparsity().mean().item() for k, m in masks.masks.items()}
    for name in ("hidden", "mlp", "layer"):  # target sparsity 0.5 each; log-alpha starts saturated
        assert after[name] > before[name] + 0.02, (name, before[name], after[name])
        assert masks.lambdas[f"{name}_1"].item() < 0 < masks.lambdas[f"{name}_2"].item()  # ascent on the gap
    assert set(last) == {"loss", "lm_loss", "lagrangian"}
    logged = (tmp_path / "logs" / "plots" / "metrics" / "expected_sparsity" / "hidden.tsv").read_text().splitlines()
    assert len(logged) == 1 + 8


def test_resume_equals_uninterrupted(tmp_path, shards, tiny, accelerator):
    changes = {"hidden_size": 48, "num_attention_heads": 2, "num_key_value_heads": 1}

    def fresh():
        model, _ = make_tiny_model(SPEC, seed=0)
        source = architecture(model.config)
        return model, L0Masks(source, {**source, **changes}, seed=0)

    def dynamic(domains):
        return build_sampler("dynamic", domains, 32, 0, None, {d: 0.0 for d in domains}, 1.0, 1e-4)

    domains = load_domains(shards, "train")
    rows = heldout_rows(shards, tiny[1], 2, seq_len=32)
    common = dict(steps=5, fingerprint="same", heldout=rows, update_every=2)
    run_a = dict(common, checkpoint_dir=tmp_path / "a", log_dir=tmp_path / "la")
    run_b = dict(common, checkpoint_dir=tmp_path / "b", log_dir=tmp_path / "lb")

    model_a, masks_a = fresh()
    sampler_a = dynamic(domains)
    train(model_a, masks_a, sampler_a, accelerator, **run_a)

    # Interrupted run: dies while drawing the 4th batch (the last checkpoint is at step 2).
    model_b, masks_b = fresh()
    sampler_b = dynamic(domains)
    draws = {"n": 0}
    real_next = sampler_b.next_batch

    def dying_next(batch_size):
        draws["n"] += 1
        if draws["n"] == 4:
            raise KeyboardInterrupt
        return real_next(batch_size)

    sampler_b.next_batch = dying_next
    with pytest.raises(KeyboardInterrupt):
        train(model_b, masks_b, sampler_b, accelerator, **run_b)
    model_b, masks_b = fresh()
    sampler_b = dynamic(domains)
    assert train(model_b, masks_b, sampler_b, accelerator, **run_b).resumed_from_step == 2

    for (name, a), b in zip(masks_a.state_dict().items(), masks_b.state_dict().values()):
        assert torch.equal(a, b), name
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name
    assert sampler_a.weights == sampler_b.weights and len(sampler_b.history) == 2
    logged = (tmp_path / "lb" / "plots" / "metrics" / "train" / "lm_loss.tsv").read_text().splitlines()
    assert [int(line.split("\t")[0]) for line in logged[1:]] == list(range(1, 6))  # no duplicated rows


@pytest.mark.parametrize("activation_checkpointing", [False, True])
def test_prune_sheared_exports_the_target_shape(tmp_path, shards, tiny, accelerator, activation_checkpointing):
    model, tok = tiny
    sampler = DomainSampler(load_domains(shards, "train"), seq_len=32, seed=0)
    source = architecture(model.config)
    target = {**source, "num_hidden_layers": 3, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}
    masks = L0Masks(source, target, temperature=2 / 3, seed=0)
    pruned, record = prune_sheared(
        model, masks, sampler, plan(4), accelerator, lr_model=1e-4 if activation_checkpointing else 0.0,
        lr_mask=1.0, lr_lambda=1.0, lagrangian_warmup_fraction=0.5, checkpoint_every=10,
        checkpoint_dir=tmp_path / "ckpt", fingerprint="e2e", activation_checkpointing=activation_checkpointing)
    assert {k: getattr(pruned.config, k) for k in target} == target
    assert record["training"]["steps"] == 4 and record["method"] == "sheared"
    assert set(record["lambdas"]) == {f"{n}_{i}" for n in ("layer", "head", "mlp", "hidden") for i in (1, 2)}
    save_model(pruned, tok, tmp_path / "out", record)
    json.loads((tmp_path / "out" / "shear.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert loaded.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False).shape == (1, 6)


def test_activation_checkpointing_changes_nothing(tmp_path, shards, accelerator):
    """Recomputing activations in backward gives the same masks and weights as keeping them."""
    results = []
    for on in (False, True):
        model, _ = make_tiny_model(SPEC, seed=0)
        source = architecture(model.config)
        masks = L0Masks(source, {**source, "hidden_size": 48, "intermediate_size": 96}, seed=0)
        sampler = DomainSampler(load_domains(shards, "train"), seq_len=32, seed=0)
        train(model, masks, sampler, accelerator, 3, tmp_path / f"c{on}", tmp_path / f"l{on}",
              activation_checkpointing=on)
        results.append((masks.state_dict(), model.state_dict()))
    for a, b in zip(*results):
        for name in a:
            assert torch.allclose(a[name], b[name], atol=1e-6), name
