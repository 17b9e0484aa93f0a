"""Atomic outputs and training checkpoints: killed runs leave nothing behind, no pickle is ever
loaded, corrupt files give one line, a checkpoint round-trips exactly."""
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from shear import trainer
from shear.errors import ShearError
from shear.io import atomic_dir, file_digest, model_digest, recover_dir
from shear.trainer import read_checkpoint, save_checkpoint


class Payload:
    """Unpickling this creates `marker`: proof that code ran from a data file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_atomic_dir_replaces_and_cleans_leftovers(tmp_path):
    out = tmp_path / "retrained"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("one")
    # A run killed while writing left a half-written temporary directory.
    (tmp_path / ".retrained.tmp-dead").mkdir()
    (tmp_path / ".retrained.tmp-dead" / "model.safetensors").write_bytes(b"half")
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("two")
    assert (out / "a.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["retrained"]


def test_atomic_dir_failure_keeps_the_old_output(tmp_path):
    out = tmp_path / "pruned"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "a.txt").write_text("new")
            raise RuntimeError("killed")
    assert (out / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]


def test_kill_between_the_renames_is_restored(tmp_path):
    out = tmp_path / "retrained"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("previous")
    # The state a kill between `path -> .old` and `.tmp -> path` leaves: no output path.
    os.replace(out, tmp_path / ".retrained.old-1234")
    (tmp_path / ".retrained.tmp-abcd").mkdir()
    recover_dir(out)
    assert (out / "a.txt").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["retrained"]
    # The next atomic_dir repairs it too, before writing.
    os.replace(out, tmp_path / ".retrained.old-99")
    with atomic_dir(out) as tmp:
        assert (out / "a.txt").read_text() == "previous"
        (tmp / "a.txt").write_text("next")
    assert (out / "a.txt").read_text() == "next"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["retrained"]


def test_digests(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    before = model_digest(tmp_path)
    assert before == file_digest([tmp_path / "config.json", tmp_path / "model.safetensors"]) and len(before) == 16
    (tmp_path / "model.safetensors").write_bytes(b"weightz")
    assert model_digest(tmp_path) != before


def state_example():
    tied = torch.randn(4, 3)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.randn(2, 2))], lr=1e-3)
    opt.param_groups[0]["params"][0].grad = torch.ones(2, 2)
    opt.step()
    return {"step": 3, "weights": {"embed": tied, "head": tied, "norm": torch.ones(3, dtype=torch.bfloat16)},
            "optimizer": opt.state_dict(), "rng": [{"cpu": torch.get_rng_state()}],
            "sampler": {"weights": {"a": 0.25}, "rng": {"state": {"state": 2 ** 100, "inc": 7}},
                        "order": {"a": [2, 0, 1]}},
            "losses_before": {"mean": float("nan")}, "last": {}}


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, float) and a != a:
        assert b != b
    else:
        assert a == b


def test_checkpoint_round_trip_in_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "SHARD_BYTES", 40)  # several shards, each written and renamed in turn
    state = state_example()
    save_checkpoint(tmp_path, "run-a", 3, state)
    files = sorted(p.name for p in (tmp_path / "last").iterdir())
    assert len([f for f in files if f.startswith("tensors-")]) > 2 and "meta.json" in files
    assert not [f for f in files if f.startswith(".")]  # no temporary files left
    loaded = read_checkpoint(tmp_path, "run-a", "test")
    assert_same(state, loaded)
    # The optimizer state loads into a fresh optimizer (its int keys survived JSON).
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.randn(2, 2))], lr=1e-3)
    opt.load_state_dict(loaded["optimizer"])
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    # A smaller next checkpoint removes the shards it no longer needs.
    monkeypatch.setattr(trainer, "SHARD_BYTES", 1 << 30)
    save_checkpoint(tmp_path, "run-a", 4, state)
    assert sorted(p.name for p in (tmp_path / "last").iterdir()) == ["meta.json", "tensors-00001.safetensors"]
    assert read_checkpoint(tmp_path, "run-a", "test")["step"] == 3  # the state's own step field, as saved


def test_interrupted_save_is_not_resumed(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(trainer, "SHARD_BYTES", 40)
    save_checkpoint(tmp_path, "run-a", 2, state_example())
    # A kill after the first shard of step 4 replaced its predecessor, before meta.json.
    first = tmp_path / "last" / "tensors-00001.safetensors"
    save_file({"x": torch.zeros(1)}, str(first), metadata={"fingerprint": "run-a", "step": "4"})
    assert read_checkpoint(tmp_path, "run-a", "test") is None
    assert "a save was interrupted" in capsys.readouterr().out


def test_other_run_is_ignored_before_any_tensor_is_read(tmp_path, capsys):
    marker = tmp_path / "pwned"
    save_checkpoint(tmp_path, "run-a", 2, state_example())
    # Tensor files that would run code if anything unpickled them; the fingerprint differs.
    for f in (tmp_path / "last").glob("tensors-*"):
        f.write_bytes(pickle.dumps(Payload(marker)))
    assert read_checkpoint(tmp_path, "run-b", "test") is None
    assert "ignoring the checkpoint" in capsys.readouterr().out
    assert not marker.exists()


@pytest.mark.parametrize("where", ["old state.pt", "tensor file", "meta.json"])
def test_planted_pickle_never_runs(tmp_path, where):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(Payload(marker))
    ckpt = tmp_path / "ckpt"
    if where == "old state.pt":  # the old formats: data/checkpoints/prune/state.pt, <dir>/last/state.pt
        (ckpt / "last").mkdir(parents=True)
        (ckpt / "state.pt").write_bytes(payload)
        (ckpt / "last" / "state.pt").write_bytes(payload)
        assert read_checkpoint(ckpt, "run-a", "test") is None
        save_checkpoint(ckpt, "run-a", 2, state_example())  # the next save removes the old files
        assert not (ckpt / "state.pt").exists() and not (ckpt / "last" / "state.pt").exists()
    elif where == "tensor file":
        save_checkpoint(ckpt, "run-a", 2, state_example())
        (ckpt / "last" / "tensors-00001.safetensors").write_bytes(payload)
        with pytest.raises(ShearError, match=r"tensors-00001.safetensors: corrupt checkpoint file \(.*\); delete"):
            read_checkpoint(ckpt, "run-a", "test")
    else:
        save_checkpoint(ckpt, "run-a", 2, state_example())
        (ckpt / "last" / "meta.json").write_bytes(payload)
        with pytest.raises(ShearError, match=r"meta.json: corrupt JSON"):
            read_checkpoint(ckpt, "run-a", "test")
    assert not marker.exists()
    with open(marker.with_name("control"), "wb") as f:  # the payload does work when unpickled
        f.write(payload)
    pickle.loads(payload)
    assert marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing", "not a checkpoint"])
def test_damaged_checkpoint_is_one_line(tmp_path, damage):
    save_checkpoint(tmp_path, "run-a", 2, state_example())
    shard = tmp_path / "last" / "tensors-00001.safetensors"
    meta = tmp_path / "last" / "meta.json"
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:100])
    elif damage == "garbage":
        shard.write_bytes(b"\x00" * 64)
    elif damage == "missing":
        shard.unlink()
    else:
        meta.write_text(json.dumps({"step": 2}))
    with pytest.raises(ShearError) as e:
        read_checkpoint(tmp_path, "run-a", "test")
    assert "\n" not in str(e.value) and "delete" in str(e.value)
