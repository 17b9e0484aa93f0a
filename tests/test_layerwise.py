"""Layer-by-layer scoring equals whole-model scoring (same ranking, values within 1e-5 relative)."""
import pytest
import torch

from shear.errors import ShearError
from shear.importance.blocks import score_blocks
from shear.importance.layerwise import (
    CheckpointBlocks,
    check_layerwise_criteria,
    layerwise_width_scores,
    score_blocks_layerwise,
)
from shear.importance.width import activation_scores
from shear.models import load_model, make_tiny_model, save_model

REL = 1e-5


def rank(scores):
    return sorted(range(len(scores)), key=lambda i: (scores[i], i))


@pytest.fixture(scope="module", params=["tied=1", "tied=0"])
def checkpoint(request, tmp_path_factory):
    """A saved 6-block tiny model with trained-looking (perturbed) weights and calibration rows."""
    model, tok = make_tiny_model(f"layers=6,hidden=64,heads=4,kv_heads=2,mlp=128,{request.param}", seed=1)
    with torch.no_grad():  # random init leaves norms at 1: vary them so every block differs
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    directory = tmp_path_factory.mktemp("ckpt") / "model"
    save_model(model, tok, directory, {"source": "tiny"})
    calib = torch.randint(0, 256, (5, 24), generator=torch.Generator().manual_seed(0))
    return directory, calib


@pytest.mark.parametrize("criterion", ["ppl", "ppl+", "bi", "angular", "sleb", "magnitude", "random"])
def test_block_scores_equal_whole_model(checkpoint, criterion):
    directory, calib = checkpoint
    model, _, _ = load_model(directory)
    kw = dict(n=2, batch_size=2, keep_first=1, keep_last=1, seed=3)
    whole = score_blocks(model, calib, criterion, **kw)
    layerwise = score_blocks_layerwise(CheckpointBlocks(directory), calib, criterion, **kw)
    assert set(whole) == set(layerwise)
    for key in whole:
        if key == "scores" or key == "unpruned_ppl":
            continue
        assert whole[key] == layerwise[key], key
    a, b = whole["scores"], layerwise["scores"]
    assert rank(a) == rank(b)
    assert max(abs(x - y) / abs(x) for x, y in zip(a, b)) < REL
    if "unpruned_ppl" in whole:
        assert abs(whole["unpruned_ppl"] - layerwise["unpruned_ppl"]) / whole["unpruned_ppl"] < REL


def test_width_activation_equals_whole_model(checkpoint):
    directory, calib = checkpoint
    model, _, _ = load_model(directory)
    whole = activation_scores(model, calib, 2)
    layerwise = layerwise_width_scores(CheckpointBlocks(directory), calib, "activation", 2)
    assert set(whole) == set(layerwise)
    for key, w in whole.items():
        rel = ((layerwise[key] - w).abs() / w.abs().clamp_min(1e-12)).max().item()
        assert rel < REL, key
        assert torch.equal(w.argsort(dim=-1, stable=True), layerwise[key].argsort(dim=-1, stable=True)), key


def test_reads_one_block_at_a_time(checkpoint, monkeypatch):
    """A block's load reads exactly that block's tensors; nothing else lives in the skeleton."""
    directory, _ = checkpoint
    source = CheckpointBlocks(directory)
    assert all(p.is_meta for p in source.skeleton.parameters())
    block = source.block(2)
    names = {n for n, _ in block.named_parameters()}
    assert names == set(source.tensors("model.layers.2.")) and names
    assert not any(p.is_meta for p in block.parameters())
    assert all(p.is_meta for p in source.skeleton.parameters())  # the skeleton stays empty


def test_bf16_layerwise_runs(checkpoint):
    directory, calib = checkpoint
    record = score_blocks_layerwise(CheckpointBlocks(directory, dtype=torch.bfloat16), calib, "ppl", n=2,
                                    batch_size=5)
    assert len(record["scores"]) == 6 and all(s > 1 for s in record["scores"])


def test_taylor_is_refused_with_one_line():
    with pytest.raises(ShearError, match=r"taylor\+?, .*width taylor.*whole model") as e:
        check_layerwise_criteria(["ppl", "taylor", "taylor+"], ["activation", "taylor"])
    assert "\n" not in str(e.value)
