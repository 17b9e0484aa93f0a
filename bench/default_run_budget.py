"""Benchmark: CPU cost of the default run's compute, per token, for bench/results/default_run_budget.md.

The 2-core machine this project runs on is shared, so wall-clock figures there mostly measure
the other processes. This script measures CPU seconds (`time.process_time`) of one process
with ONE torch thread, which the load changes little, and runs A/B pairs alternated in the
same process:

  forward      model forward (no grad) of 8 x 128 tokens: base and pruned, alternated
  ppl@128      shear.evaluate.perplexity over the same rows of 128 tokens, `--rows-128` rows,
               in passes of each of `--passes-128` rows (the figures must not depend on it)
  ppl@1024     the same at 1024 tokens, passes of each of `--passes-1024` rows
  lm-eval      shear_foldoc_mc on `--task-docs` documents at each lm-eval batch size
  score        the score stage's default criteria on its calibration set (params.yaml `score`),
               each criterion's CPU time, with the calibration states shared (as the stage
               does) and, alternated, recomputed by each of ppl, bi and angular and the width
               Taylor gradient taken again (as before, less one forward pass: the unpruned
               perplexity then used its own)

Needs data/models/{base,pruned}, data/shards and data/heldout (a finished `dvc repro`).
Writes bench/results/default_run_budget.json (with the machine and its load average).

    python -m bench.default_run_budget [--sections forward ppl lm-eval score] [--rows-128 32] ...
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from shear.config import load_params
from shear.data import calibration_batch, load_domains, rechunk
from shear.evaluate import perplexity, run_tasks
from shear.importance.blocks import score_blocks
from shear.importance.width import width_scores
from shear.io import write_json
from shear.models import load_model, offline
from shear.speed import machine_info

RESULTS = Path("bench/results")


def cpu_timed(fn):
    """(result, CPU seconds of this process, wall seconds)."""
    cpu, wall = time.process_time(), time.perf_counter()
    result = fn()
    return result, time.process_time() - cpu, time.perf_counter() - wall


def score_costs(model, tokenizer, shared: bool) -> dict[str, float]:
    """CPU seconds of each default block and width criterion, in the stage's order, one memo;
    `shared=False` drops the cached calibration states before each criterion and computes the
    width Taylor scores again (the old cost, less the unpruned perplexity's own pass)."""
    sc = load_params("params.yaml").score
    calib = calibration_batch("data/shards", sc.calib_sequences, sc.calib_seq_len, tokenizer)
    memo, costs = {}, {}
    for criterion in sc.block_criteria:
        if not shared:
            memo.pop("states", None)
        _, cpu, _ = cpu_timed(lambda: score_blocks(model, calib, criterion, n=6, batch_size=sc.batch_size,  # noqa: B023
                                                   keep_first=sc.keep_first, keep_last=sc.keep_last, memo=memo))
        costs[f"block {criterion}"] = cpu
    for criterion in sc.width_criteria:
        kept = memo.get(f"width_{criterion}") if shared else None  # as stages/score.py
        _, costs[f"width {criterion}"], _ = cpu_timed(
            lambda c=criterion, k=kept: k if k is not None else width_scores(model, calib, c, sc.batch_size))
    print(f"score ({'shared' if shared else 'recomputed'} states): {sum(costs.values()):.1f} s CPU {costs}", flush=True)
    return costs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows-128", type=int, default=32)
    parser.add_argument("--passes-128", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--rows-1024", type=int, default=4)
    parser.add_argument("--passes-1024", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--task-docs", type=int, default=16)
    parser.add_argument("--task-batch-sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--repeats", type=int, default=2, help="A/B rounds (default 2)")
    parser.add_argument("--sections", nargs="+", default=["forward", "ppl", "lm-eval", "score"],
                        choices=["forward", "ppl", "lm-eval", "score"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: CPU time is then the work)")
    parser.add_argument("--out", type=Path, default=RESULTS / "default_run_budget.json")
    args = parser.parse_args(argv)
    offline()
    torch.set_num_threads(args.threads)
    load_before = list(os.getloadavg())
    base, tok, _ = load_model("data/models/base")
    pruned, _, _ = load_model("data/models/pruned")
    split = load_domains("data/shards", "eval", tok)["books"]
    rows = {n: torch.from_numpy(np.asarray(rechunk(split, n)[:k], dtype=np.int64))
            for n, k in ((128, args.rows_128), (1024, args.rows_1024))}
    perplexity(base, rows[128][:2], 2)  # untimed: first-call allocations
    out: dict = {"forward": {"base": [], "pruned": []}, "ppl": {}, "lm_eval": {}, "score": {"shared": [], "recomputed": []}}
    for r in range(args.repeats):
        # the arms in alternating order: the first run of the ppl criterion in a process is slower
        order = (True, False) if r % 2 == 0 else (False, True)
        for shared in (order if "score" in args.sections else ()):
            out["score"]["shared" if shared else "recomputed"].append(score_costs(base, tok, shared))
        for name, model in ((("base", base), ("pruned", pruned)) if "forward" in args.sections else ()):
            with torch.no_grad():
                _, cpu, wall = cpu_timed(lambda: model(input_ids=rows[128][:8], use_cache=False))  # noqa: B023
            out["forward"][name].append({"tokens": 8 * 128, "cpu_s": cpu, "wall_s": wall})
        for length, passes in (((128, args.passes_128), (1024, args.passes_1024)) if "ppl" in args.sections else ()):
            for per_pass in passes:
                result, cpu, wall = cpu_timed(lambda: perplexity(base, rows[length], per_pass))  # noqa: B023
                out["ppl"].setdefault(f"{length}x{per_pass}", []).append(
                    {"tokens": rows[length].numel(), "cpu_s": cpu, "wall_s": wall, "loss": result["loss"]})
                print(f"ppl@{length}, {per_pass} rows per pass: {cpu:.1f} s CPU, loss {result['loss']:.8f}", flush=True)
        for bs in (args.task_batch_sizes if "lm-eval" in args.sections else ()):
            result, cpu, wall = cpu_timed(lambda b=bs: run_tasks(base, tok, ["shear_foldoc_mc"], "data/heldout",
                                                                 args.task_docs, b, 0))
            out["lm_eval"].setdefault(str(bs), []).append({"docs": args.task_docs, "cpu_s": cpu, "wall_s": wall,
                                                           "acc": result["shear_foldoc_mc"]["acc"]})
            print(f"lm-eval foldoc {args.task_docs} docs, batch {bs}: {cpu:.1f} s CPU", flush=True)
    out["machine"] = machine_info("cpu") | {"load_average_before": load_before}
    write_json(args.out, out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
