"""Sheared pruning under FSDP (2 gloo processes on CPU): equal to one process, resumable after a
kill on the same or another number of processes, checkpoints sharded safetensors."""
import argparse
import json
import shutil

import psutil
import pytest
import torch
from safetensors import safe_open

from shear.plan import fsdp_chosen, plan_stages
from shear.trainer import SHARDED_DIR, read_checkpoint
from tests.conftest import full_params
from tests.test_sheared import STEPS, TOLERANCE, run_stage_process, write_stage_inputs

CHECKPOINTS = "data/checkpoints/prune"


def sharded_weights(directory):
    """Whole tensors reassembled from every rank's shard file by the offsets in its header
    (torch.distributed.checkpoint's safetensors layout), independently of the loader under test."""
    pieces: dict[str, list] = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            offsets = json.loads(f.metadata()["DCP_SHARDING_INFO"])
            for key in f.keys():
                pieces.setdefault(key, []).append((offsets[key]["saved_offsets"], f.get_tensor(key)))
    whole = {}
    for key, parts in pieces.items():
        shape = [max(o[d] + t.shape[d] for o, t in parts) for d in range(parts[0][1].dim())]
        t = torch.empty(shape, dtype=parts[0][1].dtype)
        for o, piece in parts:
            t[tuple(slice(a, a + n) for a, n in zip(o, piece.shape))] = piece
        whole[key] = t
    return whole


def final_state(root):
    """Masks, multipliers and trained weights after the last step, the checkpoint's meta.json and its files."""
    last = root / CHECKPOINTS / "last"
    meta = json.loads((last / "meta.json").read_text())
    state = read_checkpoint(root / CHECKPOINTS, meta["fingerprint"], "test")
    assert state["step"] == STEPS
    if "sharded" in state:
        weights = {k.removeprefix("weights."): v for k, v in sharded_weights(last / SHARDED_DIR).items()
                   if k.startswith("weights.")}
    else:
        weights = state["weights"]
    masks = {f"masks.{k}": v for k, v in state["objective"]["masks"].items()}
    return {**masks, **weights}, meta, sorted(p.relative_to(last).as_posix() for p in last.rglob("*") if p.is_file())


def kill_after_first_checkpoint(process, root):
    """SIGKILL the stage, its launcher and its ranks once the first checkpoint is complete; its step."""
    meta = root / CHECKPOINTS / "last" / "meta.json"
    while not meta.is_file() and process.poll() is None:
        psutil.wait_procs([], timeout=0.01)
    assert process.poll() is None, f"the stage ended before it was killed:\n{process.communicate()[0][-3000:]}"
    for p in [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]:
        p.kill()
    process.wait()
    return json.loads(meta.read_text())["step"]


def test_fsdp_equals_one_process_and_resumes_on_any_count(tmp_path, raw_corpus, monkeypatch):
    """2 FSDP processes (2 rows each) = 1 process (4 rows): uninterrupted, and after a SIGKILL
    resumed on 2 FSDP processes or on 1 plain process (torch reassembles the shards)."""
    from shear.config import load_params
    from stages import prune_sheared as stage

    roots = {name: tmp_path / name for name in ("one", "fsdp", "killed", "fewer")}
    for name, root in roots.items():
        root.mkdir()
        write_stage_inputs(root, raw_corpus, 1 if name == "one" else 2, sharding="fsdp", checkpoint_every=4)

    fsdp = run_stage_process(roots["fsdp"])
    killed_at = kill_after_first_checkpoint(run_stage_process(roots["killed"]), roots["killed"])
    assert killed_at == 4 and not (roots["killed"] / "data/models/pruned").exists()
    # the same interrupted run, resumed on one process (4 rows per micro-batch: the same global batch)
    shutil.copytree(roots["killed"] / "data/checkpoints", roots["fewer"] / "data/checkpoints")
    shutil.copytree(roots["killed"] / "reports", roots["fewer"] / "reports")

    def in_process(root):
        monkeypatch.chdir(root)
        stage.main(load_params("params.yaml"), argparse.Namespace(params="params.yaml"))

    in_process(roots["one"])  # the reference, meanwhile
    out, _ = fsdp.communicate(timeout=600)
    assert fsdp.returncode == 0, out[-4000:]
    assert "process(es), fsdp" in out, out[-2000:]
    resumed = run_stage_process(roots["killed"])
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-4000:]
    assert f"sheared: resuming from data/checkpoints/prune/last at step {killed_at}" in out, out
    params = (roots["fewer"] / "params.yaml").read_text()
    (roots["fewer"] / "params.yaml").write_text(params.replace("batch_size: 2", "batch_size: 4")
                                                .replace("num_processes: 2", "num_processes: 1"))
    in_process(roots["fewer"])

    reference, ref_meta, _ = final_state(roots["one"])
    reference_record = json.loads((roots["one"] / "data/models/pruned/shear.json").read_text())
    for name in ("fsdp", "killed", "fewer"):
        got, meta, files = final_state(roots[name])
        assert meta["fingerprint"] == ref_meta["fingerprint"]  # the same run, whatever the processes
        assert sorted(got) == sorted(reference)
        worst = max((got[k] - reference[k]).abs().max().item() for k in reference)
        print(f"{name} vs one process: max |difference| of masks, multipliers and weights {worst:.2e}")
        assert worst < TOLERANCE, (name, worst)
        record = json.loads((roots[name] / "data/models/pruned/shear.json").read_text())
        assert record["kept"] == reference_record["kept"]
        assert record["training"]["sharding"] == "ddp" if name == "fewer" else "fsdp"
        if name != "fewer":  # written under FSDP: one shard file per rank, safetensors and JSON only
            assert [f for f in files if f.startswith(SHARDED_DIR)] == [
                f"{SHARDED_DIR}/shard-00001-model-00001-of-00001.safetensors",
                f"{SHARDED_DIR}/shard-00002-model-00001-of-00001.safetensors"], files
        else:  # written by one process: the full format, the shards of the FSDP run gone
            assert not any(f.startswith(SHARDED_DIR) for f in files), files
        assert all(f.endswith((".safetensors", "meta.json")) for f in files), files
    assert json.loads((roots["killed"] / "data/models/pruned/shear.json").read_text())["training"][
        "resumed_from_step"] == killed_at
    assert json.loads((roots["fewer"] / "data/models/pruned/shear.json").read_text())["training"][
        "world_size"] == 1


@pytest.mark.parametrize("sharding,processes,fits,expected", [
    ("auto", 4, True, False), ("auto", 4, False, True), ("fsdp", 4, True, True), ("ddp", 4, False, False),
    ("fsdp", 1, False, False),
])
def test_fsdp_chosen(sharding, processes, fits, expected):
    assert fsdp_chosen(sharding, processes, fits) is expected


def test_plan_shards_sheared_pruning_when_one_device_cannot_hold_it(tiny):
    """sharding auto: the plan's sheared row is FSDP's per-device memory exactly when the unsharded run does not fit."""
    from shear.config import parse_params

    def plan(sharding, device_bytes):
        params = parse_params(full_params({"prune": {"method": "sheared", "sheared": {
            "num_processes": 4, "sharding": sharding}}}))
        return plan_stages(params, tiny[0].config, torch.float32, "cpu", device_bytes)["prune"]

    unsharded = plan("ddp", 2**50).memory
    sharded = plan("fsdp", 2**50).memory
    # weights, gradients and AdamW divided over 4 processes, plus two gathered blocks
    assert sharded.optimizer == -(-unsharded.optimizer // 4) and sharded.total < unsharded.total
    assert not plan("auto", unsharded.total).sharded
    between = plan("auto", unsharded.total - 1)
    assert between.sharded and between.memory == sharded
