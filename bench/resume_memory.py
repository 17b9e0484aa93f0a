"""Host memory of resuming a training checkpoint: every tensor read at once vs streamed.

A CPT-like state of the default model (float32 weights and both AdamW moments: 12 bytes per
parameter) is saved with shear.trainer.save_checkpoint; then, in a fresh process each, the
model and an AdamW whose state exists already (as fit has them when it resumes) load it
through `fit`'s own path (`read_checkpoint` + `load_weights_and_optimizer`), once with
every tensor read first (`stream=False`, as resume did before) and once streamed
(`stream=True`). Reported: peak RSS above the RSS just before reading, and that the loaded
state equals the saved one. Writes bench/results/resume_memory.{json,md}.

    python -m bench.resume_memory --base /tmp/base     # a saved default model (the base stage's output)
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from shear.io import atomic_file, write_json
from shear.models import load_model, offline, return_freed_memory
from shear.speed import machine_info

RESULTS = Path(__file__).resolve().parent / "results"
MiB = 2**20


def reset_peak_rss() -> int:
    """Reset this process's peak RSS (VmHWM) to its RSS now (Linux >= 4.0); returns that RSS."""
    Path("/proc/self/clear_refs").write_text("5")
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss() -> int:
    """This process's peak RSS since the last reset (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def model_and_optimizer(base: str, seed: int):
    """The base model in float32 and an AdamW with one step's state (moments of a seeded gradient)."""
    from shear.trainer import decay_groups, make_accelerator, make_optimizer

    model = load_model(base)[0]
    optimizer = make_optimizer(decay_groups(model.parameters(), 1e-4, 0.1), (0.9, 0.95))
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    accelerator = make_accelerator("cpu")
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer


def child(base: str, directory: str, stream: bool) -> dict:
    """Resume from `directory` into a model and optimizer that already hold (other) values."""
    from shear.trainer import load_weights_and_optimizer, read_checkpoint

    return_freed_memory()  # as every stage does
    accelerator, model, optimizer = model_and_optimizer(base, seed=1)
    before = reset_peak_rss()
    state = read_checkpoint(directory, "bench", "bench", announce=False, stream=stream)
    load_weights_and_optimizer(accelerator, model, optimizer, state["weights"], state["optimizer"])
    peak = peak_rss()
    # the saved values (seed 0), not the child's own (seed 1), are in place
    check = read_checkpoint(directory, "bench", "bench", announce=False, stream=True)
    name = next(iter(check["weights"]))
    same = torch.equal(dict(model.named_parameters())[name].detach(), check["weights"][name].load())
    slot = next(iter(check["optimizer"]["state"]))
    same &= torch.equal(optimizer.optimizer.state_dict()["state"][slot]["exp_avg"],
                        check["optimizer"]["state"][slot]["exp_avg"].load())
    return {"stream": stream, "rss_before_bytes": before, "peak_above_bytes": peak - before,
            "loaded_equals_saved": bool(same)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True)
    parser.add_argument("--child", choices=["eager", "stream"])
    parser.add_argument("--checkpoint")
    args = parser.parse_args()
    offline()
    if args.child:
        print("RESULT " + json.dumps(child(args.base, args.checkpoint, args.child == "stream")))
        return
    from shear.trainer import save_checkpoint, weights_and_optimizer_state

    with tempfile.TemporaryDirectory() as tmp:
        accelerator, model, optimizer = model_and_optimizer(args.base, seed=0)
        weights, optim_state = weights_and_optimizer_state(accelerator, model, optimizer)
        save_checkpoint(tmp, "bench", 1, {"step": 1, "weights": weights, "optimizer": optim_state})
        size = sum(p.stat().st_size for p in (Path(tmp) / "last").iterdir())
        params = sum(p.numel() for p in model.parameters())
        del model, optimizer, weights, optim_state
        rows = []
        for mode in ("eager", "stream"):
            done = subprocess.run([sys.executable, "-m", "bench.resume_memory", "--base", args.base, "--child", mode,
                                   "--checkpoint", tmp], capture_output=True, text=True)
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(line.removeprefix("RESULT ")))
            print(rows[-1], flush=True)
    info = machine_info("cpu")
    write_json(RESULTS / "resume_memory.json", {"machine": info, "checkpoint_bytes": size, "parameters": params,
                                                "rows": rows})
    lines = ["# Resume: host memory of loading a training checkpoint, read whole vs streamed", "",
             f"Machine: {info['cpu']}; torch {info['torch']}, transformers {info['transformers']}.", "",
             f"Command: `python -m bench.resume_memory --base <default model>`. Checkpoint: the default model "
             f"({params:,} parameters) in float32 with both AdamW moments, {size / MiB:,.0f} MiB on disk. Each mode "
             "in a fresh process whose model and optimizer already hold their state (as `fit` has them); peak RSS "
             "above the RSS just before reading.", "",
             "| mode | peak RSS above the model + optimizer MiB | loaded == saved |", "|---|---|---|"]
    for r in rows:
        what = "every tensor read first (before)" if not r["stream"] else "streamed, one tensor at a time (now)"
        lines.append(f"| {what} | {r['peak_above_bytes'] / MiB:,.0f} | {r['loaded_equals_saved']} |")
    with atomic_file(RESULTS / "resume_memory.md") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'resume_memory.md'}")


if __name__ == "__main__":
    main()
