"""Resume streams the checkpoint (weights and optimizer moments read one tensor at a time into place)
and a resumed retrain stage still equals an uninterrupted one."""
import argparse

import pytest
import torch

from shear.config import parse_params
from shear.models import load_model, make_tiny_model, save_model
from shear.trainer import StoredTensor, read_checkpoint, save_checkpoint
from stages import retrain

REAL_BUILD, REAL_READ = retrain.build_sampler, retrain.read_checkpoint

SPEC = "layers=2,hidden=32,heads=4,kv_heads=2,mlp=64"


class Killed(Exception):
    pass


def stage_params():
    return parse_params({"run": {"device": "cpu"}, "data": {"mixture": "fixed"}, "mixture": {"eval_sequences": 2},
                         "retrain": {"method": "cpt", "batch_size": 2, "seq_len": 32, "tokens": 6 * 2 * 32,
                                     "lr": 1e-3, "checkpoint_every": 2, "eval_every": 100}})


def run_stage(root, shards, monkeypatch, die_after_draws=None, spy=None):
    """The retrain stage in `root` (a tiny pruned model, the shared shards); optionally killed."""
    root.mkdir(exist_ok=True)
    monkeypatch.chdir(root)
    if not (root / "data/models/pruned").exists():
        model, tok = make_tiny_model(SPEC, seed=0)
        save_model(model, tok, "data/models/pruned", {"method": "depth"})
        (root / "data/shards").symlink_to(shards)
    def build(*a, **k):
        sampler = REAL_BUILD(*a, **k)
        if die_after_draws is not None:
            draw, calls = sampler.next_batch, [0]

            def dying(n):
                calls[0] += 1
                if calls[0] > die_after_draws:
                    raise Killed
                return draw(n)
            sampler.next_batch = dying
        return sampler

    def read(*a, **k):
        state = REAL_READ(*a, **k)
        if spy is not None:
            spy.append(state)
        return state

    monkeypatch.setattr(retrain, "build_sampler", build)
    monkeypatch.setattr(retrain, "read_checkpoint", read)
    retrain.main(stage_params(), argparse.Namespace(params="params.yaml"))


def test_resumed_stage_streams_the_checkpoint_and_equals_uninterrupted(tmp_path, shards, monkeypatch):
    run_stage(tmp_path / "a", shards, monkeypatch)
    reference = load_model(tmp_path / "a/data/models/retrained")[0].state_dict()

    with pytest.raises(Killed):  # killed during step 4: the checkpoint of step 2 stays
        run_stage(tmp_path / "b", shards, monkeypatch, die_after_draws=3)
    states = []
    run_stage(tmp_path / "b", shards, monkeypatch, spy=states)
    resumed = states[-1]
    assert resumed["step"] == 2
    # streamed: the large parts are read when fit loads them; the small ones are plain values
    assert all(isinstance(v, StoredTensor) for v in resumed["weights"].values())
    assert all(isinstance(v, StoredTensor) for slots in resumed["optimizer"]["state"].values()
               for v in slots.values())
    assert isinstance(resumed["rng"][0]["cpu"], torch.Tensor)
    retrained, _, record = load_model(tmp_path / "b/data/models/retrained")
    assert record["retrain"]["resumed_from_step"] == 2 and record["retrain"]["steps"] == 6
    for name, value in retrained.state_dict().items():
        assert torch.allclose(value, reference[name], atol=1e-6), name


def test_streamed_tensors_read_what_was_saved(tmp_path):
    weights = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.bfloat16)}
    save_checkpoint(tmp_path, "run", 1, {"step": 1, "weights": weights, "rng": [torch.ones(2)]})
    lazy = read_checkpoint(tmp_path, "run", "test", stream=True)
    eager = read_checkpoint(tmp_path, "run", "test")
    for k, v in weights.items():
        assert isinstance(lazy["weights"][k], StoredTensor) and isinstance(eager["weights"][k], torch.Tensor)
        assert torch.equal(lazy["weights"][k].load(), v) and torch.equal(eager["weights"][k], v)
        assert lazy["weights"][k].load().dtype == v.dtype
    assert torch.equal(lazy["rng"][0], torch.ones(2))
