"""Sheared pruning on several gloo processes, DDP and FSDP: equal to one process at the same global
batch, resumable after a SIGKILL on the same or another number of processes; FSDP checkpoints are
every rank's shards in safetensors (torch.distributed.checkpoint's layout), no pickle."""
import argparse
import json
import os
import shutil
import subprocess
import sys

import psutil
import pytest
import torch
import yaml
from safetensors import safe_open

from shear.models import make_tiny_model, save_model
from shear.plan import fsdp_chosen, plan_stages
from shear.trainer import SHARDED_DIR, optimizer_state_by_name, read_checkpoint
from tests.conftest import REPO, full_params

SPEC = "layers=4,hidden=64,heads=4,kv_heads=2,mlp=128"
TARGET = {"num_hidden_layers": 3, "hidden_size": 48, "num_attention_heads": 2, "num_key_value_heads": 1,
          "intermediate_size": 96}
STEPS, GLOBAL_ROWS, CHECKPOINT_EVERY = 8, 4, 4
# gloo averages two half-batch gradients where one process sums one batch (FSDP: reduce-scatters
# them): the float sums differ in order (~1e-7 relative) and Adam's normalisation carries that
# through 8 steps at lr_model 1e-3.
TOLERANCE = 1e-4
CHECKPOINTS = "data/checkpoints/prune"


def write_stage_inputs(root, raw_corpus, num_processes, sharding):
    """data/models/base, data/shards and params.yaml for a tiny sheared run of STEPS steps."""
    from shear.data import build_shards

    model, tok = make_tiny_model(SPEC, seed=0)
    save_model(model, tok, root / "data/models/base", {"method": "tiny"})
    build_shards(raw_corpus, tok, root / "data/shards", seq_len=64, calib_fraction=0.15, eval_fraction=0.15,
                 max_tokens_per_domain=200_000, seed=0)
    params = {
        "run": {"device": "cpu", "seed": 0},
        "data": {"mixture": "dynamic"},
        "mixture": {"eval_sequences": 2, "update_every": 2, "reference_loss": {"code": 0.0, "prose": 0.0}},
        "prune": {"method": "sheared", "target": TARGET,
                  "sheared": {"tokens": STEPS * GLOBAL_ROWS * 32, "batch_size": GLOBAL_ROWS // num_processes,
                              "seq_len": 32, "lr_model": 1e-3, "lr_warmup_fraction": 0.25,
                              "lagrangian_warmup_fraction": 0.5, "checkpoint_every": CHECKPOINT_EVERY,
                              "num_processes": num_processes, "sharding": sharding}},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(full_params(params)))


def run_stage_process(root):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "stages.prune_sheared"], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def failure(out: str) -> str:
    """A failed multi-process run's output for the assertion: every rank's error lines first (the
    first rank to fail is not the last to print), then the tail."""
    errors = [ln for ln in out.splitlines() if "Error" in ln or ln.startswith("error:")]
    return "\n".join(errors[:40]) + "\n...\n" + out[-3000:]


def kill_after_first_checkpoint(process, root) -> int:
    """SIGKILL the stage, its launcher and both ranks (torch elastic starts them in their own
    sessions) once the first checkpoint is complete; returns its step."""
    meta = root / CHECKPOINTS / "last" / "meta.json"
    while not meta.is_file() and process.poll() is None:
        psutil.wait_procs([], timeout=0.01)
    assert process.poll() is None, f"the stage ended before it was killed:\n{process.communicate()[0][-3000:]}"
    for p in [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]:
        p.kill()
    process.wait()
    return json.loads(meta.read_text())["step"]


def sharded_weights(directory):
    """Whole tensors reassembled from every rank's shard file by the offsets in its header,
    independently of the loader under test."""
    pieces: dict[str, list] = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            offsets = json.loads(f.metadata()["DCP_SHARDING_INFO"])
            for key in f.keys():
                pieces.setdefault(key, []).append((offsets[key]["saved_offsets"], f.get_tensor(key)))
    whole = {}
    for key, parts in pieces.items():
        shape = [max(o[d] + t.shape[d] for o, t in parts) for d in range(parts[0][1].dim())]
        t = torch.full(shape, float("nan"), dtype=parts[0][1].dtype)
        for o, piece in parts:
            t[tuple(slice(a, a + n) for a, n in zip(o, piece.shape))] = piece
        assert not t.isnan().any(), key  # every element came from some rank's shard
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


def test_ddp_and_fsdp_equal_one_process_and_resume(tmp_path, raw_corpus, monkeypatch):
    """2 processes (2 rows each), DDP or FSDP, = 1 process (4 rows); an FSDP run killed after its
    first checkpoint and resumed on 2 FSDP processes, or on 1 plain process, = the same."""
    from shear.config import load_params
    from stages import prune_sheared as stage

    runs = {"one": (1, "auto"), "ddp": (2, "ddp"), "fsdp": (2, "fsdp"), "killed": (2, "fsdp"), "fewer": (1, "fsdp")}
    roots = {name: tmp_path / name for name in runs}
    for name, (processes, sharding) in runs.items():
        roots[name].mkdir()
        write_stage_inputs(roots[name], raw_corpus, processes, sharding)

    def in_process(root):
        monkeypatch.chdir(root)
        stage.main(load_params("params.yaml"), argparse.Namespace(params="params.yaml"))
        monkeypatch.chdir(tmp_path)

    fsdp = run_stage_process(roots["fsdp"])
    killed_at = kill_after_first_checkpoint(run_stage_process(roots["killed"]), roots["killed"])
    assert killed_at == CHECKPOINT_EVERY and not (roots["killed"] / "data/models/pruned").exists()
    # the same interrupted run, to be resumed on one process (4 rows per micro-batch: the same global batch)
    for part in ("data/checkpoints", "reports/train"):
        shutil.copytree(roots["killed"] / part, roots["fewer"] / part)
    ddp = run_stage_process(roots["ddp"])
    in_process(roots["one"])  # the reference, meanwhile
    for process in (fsdp, ddp):
        out, _ = process.communicate(timeout=600)
        assert process.returncode == 0, failure(out)
    resumed = run_stage_process(roots["killed"])
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, failure(out)
    assert f"sheared: resuming from data/checkpoints/prune/last at step {killed_at}" in out, out
    in_process(roots["fewer"])

    reference, ref_meta, _ = final_state(roots["one"])
    reference_record = json.loads((roots["one"] / "data/models/pruned/shear.json").read_text())
    for name in ("ddp", "fsdp", "killed", "fewer"):
        got, meta, files = final_state(roots[name])
        assert meta["fingerprint"] == ref_meta["fingerprint"]  # the same run, whatever the processes
        assert sorted(got) == sorted(reference)
        worst = max((got[k] - reference[k]).abs().max().item() for k in reference)
        print(f"{name} vs one process: max |difference| of masks, multipliers and weights {worst:.2e}")
        assert worst < TOLERANCE, (name, worst)
        record = json.loads((roots[name] / "data/models/pruned/shear.json").read_text())
        assert record["kept"] == reference_record["kept"]
        training = record["training"]
        assert (training["world_size"], training["sharding"]) == {
            "ddp": (2, "ddp"), "fsdp": (2, "fsdp"), "killed": (2, "fsdp"), "fewer": (1, "none")}[name]
        sharded = sorted(f for f in files if f.startswith(SHARDED_DIR + "/"))
        if training["sharding"] == "fsdp":  # one file per rank, each about half of the whole
            assert sharded == [f"{SHARDED_DIR}/shard-0000{r}-model-00001-of-00001.safetensors" for r in (1, 2)]
            sizes = [(roots[name] / CHECKPOINTS / "last" / f).stat().st_size for f in sharded]
            assert max(sizes) < 0.55 * sum(sizes), sizes
        else:  # the full format, the shards of an earlier FSDP run gone
            assert sharded == [], files
        assert all(f.endswith((".safetensors", "meta.json")) for f in files), files  # no pickle, no .distcp
    for name in ("killed", "fewer"):
        assert json.loads((roots[name] / "data/models/pruned/shear.json").read_text())["training"][
            "resumed_from_step"] == killed_at


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


def testoptimizer_state_by_name_is_what_torch_distributed_checkpoint_reads(tiny):
    """A full checkpoint's position-indexed AdamW state, keyed by parameter name for an FSDP resume,
    equals torch's own name-keyed view of the same optimizer."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = tiny[0]
    optimizer = torch.optim.AdamW([{"params": [p for p in model.parameters() if p.dim() >= 2]},
                                   {"params": [p for p in model.parameters() if p.dim() < 2], "lr": 0.5}])
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    _, expected = get_state_dict(model, optimizer)
    got = optimizer_state_by_name(model, optimizer, optimizer.state_dict())
    assert list(got["state"]) == list(expected["state"]) and len(got["state"]) == len(list(model.parameters()))
    for name, moments in expected["state"].items():
        for key, value in moments.items():
            assert torch.equal(got["state"][name][key], value), (name, key)
    assert [g["params"] for g in got["param_groups"]] == [g["params"] for g in expected["param_groups"]]
