"""Peak memory of one retraining step with and without distillation, on the default model's shape.

The teacher is a random-weight model of SmolLM2-135M's shape (30 blocks, hidden 576, vocab
49152; memory does not depend on the weight values), the student the same model with 20% of
its blocks removed (24 kept), trained as the default run does (LoRA, 4 x 256 tokens, float32
on the CPU). Each objective runs one optimizer step in its own subprocess, measured two ways:
the bytes autograd saves for backward (distinct storages, through saved_tensors_hooks: exact
and repeatable, the activation memory the objective adds) and the peak RSS (resource.getrusage:
everything, teacher weights included, but coarse: glibc's allocator moves it by several hundred
MiB between identical runs). The hidden-state loss keeps one [B, T, H] teacher state per kept
block for the step (24 x 4 x 256 x 576 x 4 B = 54 MiB here), against the teacher's logits
(4 x 256 x 49152 x 4 B = 192 MiB) that logit distillation keeps.
Writes bench/results/distill_memory.{json,md}.

    OMP_NUM_THREADS=1 python -m bench.distill_memory
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from shear.io import atomic_file, write_json
from shear.speed import machine_info

RESULTS = Path(__file__).resolve().parent / "results"
SHAPE = "layers=30,hidden=576,heads=9,kv_heads=3,mlp=1536,vocab=49152,tied=1"
REMOVED = [18, 19, 20, 21, 22, 23]  # 20% of 30 blocks
BATCH, SEQ = 4, 256
# name -> (logit weight w, hidden-state weight)
OBJECTIVES = {"ce": (0.0, 0.0), "kd w=0.5": (0.5, 0.0), "kd w=1": (1.0, 0.0), "hidden": (0.0, 1.0),
              "kd w=1 + hidden": (1.0, 1.0)}


def child(name: str) -> dict:
    """One LoRA optimizer step of objective `name`: bytes saved for backward, peak RSS, seconds."""
    from shear.config import LoraParams
    from shear.distill import block_map
    from shear.models import make_tiny_model
    from shear.prune.depth import remove_blocks
    from shear.train import Retraining, apply_lora
    from shear.trainer import decay_groups, make_optimizer

    distill, hidden = OBJECTIVES[name]
    teacher, _ = make_tiny_model(SHAPE, seed=0)
    student = remove_blocks(copy.deepcopy(teacher), REMOVED)
    mapping = block_map({"removed_blocks": REMOVED}, teacher.config, student.config, "bench")
    if distill == 0 and hidden == 0:
        del teacher  # plain CE: no teacher in memory
        teacher = None
    else:
        teacher.requires_grad_(False)
    lora = LoraParams()
    student = apply_lora(student, lora.r, lora.alpha, lora.dropout, lora.target_modules)
    objective = Retraining(teacher, distill, student=student, hidden=hidden, mapping=mapping if hidden else None)
    optimizer = make_optimizer(decay_groups(student.parameters(), 1e-4, lora.weight_decay), lora.betas)
    saved: dict[tuple, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        saved[(storage.data_ptr(), t.device.type)] = storage.nbytes()
        return t

    student.train()
    t0 = time.perf_counter()
    ids = torch.randint(0, 49152, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = objective.loss(student, ids, 0)
    loss.backward()
    optimizer.step()
    return {"objective": name, "saved_for_backward": sum(saved.values()),
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "step_s": round(time.perf_counter() - t0, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", choices=OBJECTIVES)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    rows = []
    for name in OBJECTIVES:
        out = subprocess.run([sys.executable, "-m", "bench.distill_memory", "--child", name],
                             capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    machine = machine_info()
    write_json(RESULTS / "distill_memory.json", {"machine": machine, "shape": SHAPE, "removed": REMOVED,
                                                 "batch": BATCH, "seq_len": SEQ, "rows": rows})
    ce, ce_saved = rows[0]["peak_rss"], rows[0]["saved_for_backward"]
    mib = 1 << 20
    lines = ["# Peak memory of a retraining step with distillation (LoRA, default model shape, CPU float32)", "",
             f"`OMP_NUM_THREADS=1 python -m bench.distill_memory`; machine: {machine}.", "",
             f"Teacher: random weights of shape `{SHAPE}`; student: blocks {REMOVED} removed; batch {BATCH} x {SEQ}.",
             "Peak RSS is coarse (several hundred MiB between identical runs); step times are of a shared, "
             "loaded machine: indicative only.", "",
             "| objective | saved for backward (MiB) | vs CE | peak RSS (MiB) | vs CE | step s |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['objective']} | {r['saved_for_backward'] / mib:,.0f} | "
                     f"{(r['saved_for_backward'] - ce_saved) / mib:+,.0f} | {r['peak_rss'] / mib:,.0f} | "
                     f"{(r['peak_rss'] - ce) / mib:+,.0f} | {r['step_s']} |")
    with atomic_file(RESULTS / "distill_memory.md") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
