"""Profile: where the evaluate and speed stages spend their time on the default model.

Times each piece of work those stages do, on small slices, and scales it to the default
params (evaluate.*), so the per-stage time of `make repro` can be predicted without running
the pipeline:

  load        loading data/models/base
  ppl@<len>   `--ppl-batches` batches of the perplexity pass at each evaluate.ppl_seq_lens
              length (scaled to every batch of every domain)
  task <name> lm-eval on `--task-limit` documents (scaled to evaluate.task_limit)
  speed       one model's decode benchmark at each evaluate.speed batch size, one timed run
              (scaled to warm-up + repeats)

Needs data/models/base, data/shards and data/heldout (`dvc repro shards`). Writes
bench/results/eval_profile.json and .md with the machine (its load average included: on
a shared machine every figure reads slower).

    python -m bench.eval_profile [--task-limit 10]
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

from shear.config import load_params
from shear.data import load_domains, rechunk
from shear.evaluate import perplexity, run_tasks
from shear.io import atomic_file, write_json
from shear.models import load_model, offline
from shear.speed import WARMUP_EAGER, measure_speed, machine_info

RESULTS = Path("bench/results")


def timed(fn):
    """(result, seconds)."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task-limit", type=int, default=10, help="documents per lm-eval task timed (default 10)")
    parser.add_argument("--ppl-batches", type=int, default=1, help="perplexity batches timed per length (default 1)")
    parser.add_argument("--out", type=Path, default=RESULTS / "eval_profile")
    args = parser.parse_args(argv)
    offline()
    ev = load_params("params.yaml").evaluate
    model, tokenizer, _ = load_model("data/models/base")
    rows = []  # (piece, measured s, scale, expected s at the default params)

    _, s = timed(lambda: load_model("data/models/base"))
    rows.append(("load data/models/base", s, 1, s))
    splits = load_domains("data/shards", "eval", tokenizer)
    domain, split = next(iter(splits.items()))
    # untimed: the process's first forward pass pays for allocations and kernel selection
    perplexity(model, torch.from_numpy(np.asarray(rechunk(split, 128)[:2], dtype=np.int64)), 2)
    for length in ev.ppl_seq_lens:
        rows_per_domain = min(len(rechunk(split, length)), max(1, ev.ppl_max_tokens // length))
        batches = math.ceil(rows_per_domain / ev.batch_size)
        timed_rows = rechunk(split, length)[: min(batches, args.ppl_batches) * ev.batch_size]
        ids = torch.from_numpy(np.asarray(timed_rows, dtype=np.int64))
        _, s = timed(lambda: perplexity(model, ids, ev.batch_size))  # noqa: B023 (called at once)
        scale = len(splits) * batches / min(batches, args.ppl_batches)
        rows.append((f"ppl@{length}: {min(batches, args.ppl_batches)} of {batches} batches x {len(splits)} domains",
                     s, scale, s * scale))
    for task in ev.tasks:
        _, s = timed(lambda: run_tasks(model, tokenizer, [task], "data/heldout", args.task_limit, ev.batch_size, 0))  # noqa: B023
        scale = ev.task_limit / args.task_limit
        rows.append((f"lm-eval {task}, {args.task_limit} docs", s, scale, s * scale))
    sp = ev.speed
    for batch in sp.batch_sizes:
        # one timed run after its warm-up; the stage does WARMUP_EAGER + repeats runs per batch size
        _, s = timed(lambda: measure_speed(model, "cpu", [batch], sp.prompt_len, sp.new_tokens, 1, paths=["eager"]))  # noqa: B023
        runs = WARMUP_EAGER + sp.repeats
        rows.append((f"speed, one model, batch {batch} ({WARMUP_EAGER + 1} runs)", s, runs / (WARMUP_EAGER + 1),
                     s * runs / (WARMUP_EAGER + 1)))

    result = {"machine": machine_info("cpu"), "params": {"evaluate": {
        "ppl_seq_lens": ev.ppl_seq_lens, "ppl_max_tokens": ev.ppl_max_tokens, "batch_size": ev.batch_size,
        "tasks": ev.tasks, "task_limit": ev.task_limit, "speed": vars(sp)}},
        "rows": [{"piece": p, "measured_s": m, "scale": k, "expected_s": e} for p, m, k, e in rows]}
    write_json(args.out.with_suffix(".json"), result)
    lines = ["# Where the evaluate and speed stages spend their time (default model, CPU)", "",
             f"Machine: {result['machine']['cpu']}, {result['machine']['cpu_cores']} cores, torch threads "
             f"{result['machine']['torch_threads']}, load average {result['machine']['load_average']}.", "",
             "| piece | measured s | scale | expected s at default params |", "|---|---:|---:|---:|"]
    lines += [f"| {p} | {m:.1f} | {k:.2f} | {e:.1f} |" for p, m, k, e in rows]
    with atomic_file(args.out.with_suffix(".md")) as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
