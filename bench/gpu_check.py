"""The prepared GPU check: one script, under 8 minutes on one H200, random-weight models.

Parts (each under its own time budget inside one overall deadline; a failing or slow part
is recorded and the next one runs; results are rewritten after every part):
  ppl_scoring    fast vs loop PPL block scoring on the LLaMA-2-7B shape in bf16
                 (bench.score_speed.compare; target >= 1.8x, identical ranking)
  sheared_steps  a few Sheared-LLaMA pruning steps from the LLaMA-2-7B shape towards the
                 Sheared-LLaMA-1.3B shape: float32 master weights, bf16 autocast, AdamW over
                 weights, masks and multipliers; tokens/s and peak memory against shear.plan's
                 estimate at the micro-batch the plan picks for this device
  cpt_step       continued pre-training steps on the 1.3B shape (bench.train_speed.measure):
                 tokens/s and MFU (target >= 40%)
  mask_overhead  masked vs plain training step on the 1.3B shape (bench.sheared_speed.compare;
                 target <= 1.3x)
  decode         bench.decode_speed's table for the 7B shape (batch-1 decode within 1.5x of the
                 weight-read floor, depth-pruned speed-up >= 0.95x of ideal, spread < 5%)
Models are built from configs directly on the device (bench.decode_speed.build). Needs
torch and transformers only (no dvc, dvclive, lm-eval or gguf). Writes
bench/results/gpu_check.{json,md}.

    python -m bench.gpu_check                  # on the GPU machine
    python -m bench.gpu_check --smoke --out /tmp/x   # tiny shapes on the CPU, seconds (tests)
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import signal
import time
import traceback
from pathlib import Path

import torch

from bench.decode_speed import SHAPES, build, make_config
from bench.sheared_speed import SHEARED_1_3B
from shear.io import atomic_file, write_json
from shear.models import offline
from shear.speed import machine_info

RESULTS = Path(__file__).resolve().parent / "results"
TOTAL_BUDGET_S = 450  # the whole check, start-up excluded: 7.5 minutes

# per part: (budget in seconds, settings on the GPU, settings for --smoke)
SMOKE_SHAPE = SHAPES["tiny"]
SMOKE_TARGET = dict(num_hidden_layers=4, hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
                    intermediate_size=64, head_dim=16, vocab_size=320, tie_word_embeddings=False)
PARTS = {
    "ppl_scoring": (60, dict(sequences=4, seq_len=128), dict(sequences=2, seq_len=16)),
    "sheared_steps": (100, dict(seq_len=1024, steps=4), dict(seq_len=16, steps=2)),
    "cpt_step": (60, dict(batch=4, seq_len=2048, steps=4, warmup=2), dict(batch=1, seq_len=16, steps=1, warmup=1)),
    "mask_overhead": (60, dict(batch=4, seq_len=1024, repeats=5, warmup=2),
                      dict(batch=1, seq_len=16, repeats=1, warmup=0)),
    "decode": (300, ["--batch-sizes", "1", "32", "--new-tokens", "64", "--repeats", "3",
                     "--variants", "depth-20%", "width-20%", "--no-baseline"],
               ["--device", "cpu", "--shape", "tiny", "--batch-sizes", "1", "--prompt-len", "8", "--new-tokens",
                "4", "--repeats", "1", "--paths", "eager", "--variants", "depth-20%", "--no-baseline"]),
}


class PartTimeout(Exception):
    """A part ran past its budget."""


@contextlib.contextmanager
def time_budget(seconds: float):
    """Raise PartTimeout in the main thread after `seconds` (checked between Python bytecodes)."""
    def expire(signum, frame):
        raise PartTimeout(f"over its budget of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def free(device: torch.device) -> None:
    """Return the previous part's memory before the next one starts."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def source_shape(smoke: bool) -> dict:
    return SMOKE_SHAPE if smoke else SHAPES["llama2-7b"]


def target_shape(smoke: bool) -> dict:
    return SMOKE_TARGET if smoke else {**SHEARED_1_3B, "rope_theta": 10000.0}


def part_ppl_scoring(device, dtype, smoke, sequences, seq_len) -> dict:
    """Fast vs loop (and seed loop) PPL scoring on the 7B shape (bench.score_speed.compare)."""
    from bench.score_speed import compare

    shape = source_shape(smoke)
    model = build(make_config(shape, seq_len), device, dtype)
    calib = torch.randint(0, shape["vocab_size"], (sequences, seq_len), generator=torch.Generator().manual_seed(0))
    row = compare("LLaMA-2-7B shape, random" if not smoke else "tiny", model, calib, sequences)
    row["targets"] = {"speedup_vs_loop >= 1.8": row["speedup"]["vs_loop"] >= 1.8,
                      "same ranking": all(row["same_ranking"].values())}
    return row


def part_sheared_steps(device, dtype, smoke, seq_len, steps) -> dict:
    """Sheared pruning steps 7B -> 1.3B at the plan's micro-batch; tokens/s and peak memory vs plan."""
    from shear.config import Params
    from shear.models import architecture
    from shear.plan import RUNTIME_BYTES, GiB, plan_stages
    from shear.prune.l0 import L0Masks
    from shear.prune.shapes import resolve_target
    from bench.sheared_speed import masked_step
    from shear.prune.sheared import MaskHooks, ShearedObjective, make_weights_optimizer

    shape, target = source_shape(smoke), target_shape(smoke)
    config = make_config(shape, seq_len)
    params = Params()
    params.prune.method = "sheared"
    params.prune.sheared.seq_len = seq_len
    params.prune.sheared.batch_size = 4
    device_bytes = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 8 * GiB
    # the largest micro-batch that fits one device by the plan, with 10% left for fragmentation
    plan = plan_stages(params, config, dtype, device.type, int(0.9 * device_bytes), max_processes=1)["prune"]
    micro_batch = max(plan.micro_batch, 1)
    params.prune.sheared.batch_size = micro_batch
    estimate = plan_stages(params, config, dtype, device.type, device_bytes)["prune"].memory.total
    model = build(config, device, torch.float32).train()  # float32 master weights, bf16 autocast
    keys = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size")
    masks = L0Masks(architecture(model.config), resolve_target(model.config, {k: target[k] for k in keys}, 1))
    masks = masks.to(device)
    hooks = MaskHooks(model, masks)
    optimizer = make_weights_optimizer(model, 1e-4)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, shape["vocab_size"], (micro_batch, seq_len), generator=generator).to(device)
               for _ in range(steps + 1)]
    objective = ShearedObjective(masks, hooks, None, lagrangian_warmup_steps=steps, source_params=1.0, seed=0)
    masked_step(model, objective, optimizer, batches[0])  # warm-up: optimizer state allocated
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in batches[1:]:
        loss = masked_step(model, objective, optimizer, batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    row = {"source": {k: shape[k] for k in keys}, "target": {k: target[k] for k in keys},
           "micro_batch": micro_batch, "seq_len": seq_len, "steps": steps, "last_lm_loss": round(loss, 4),
           "tokens_per_s": round(micro_batch * seq_len / seconds, 1), "step_s": round(seconds, 3),
           "plan_estimate_gib": round(estimate / GiB, 2),
           "plan_estimate_without_runtime_gib": round((estimate - RUNTIME_BYTES[device.type]) / GiB, 2),
           "reference": "LLM-Shearing: 14,750 tok/s on 8 A100s (~1,840 per GPU)"}
    if device.type == "cuda":
        row["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / GiB, 2)
        row["estimate_over_measured"] = round(row["plan_estimate_without_runtime_gib"] / row["peak_allocated_gib"], 3)
    hooks.remove()
    return row


def part_cpt_step(device, dtype, smoke, batch, seq_len, steps, warmup) -> dict:
    """CPT steps on the 1.3B shape with shear/train.py's step (bench.train_speed.measure); MFU."""
    from bench.train_speed import gpu_peak, matmul_parameters, measure

    template = build(make_config(target_shape(smoke), seq_len), device, torch.float32)
    row = measure(template, "cpt", "shear", batch, seq_len, device, steps, warmup, False)
    n = matmul_parameters(template)
    peak = gpu_peak(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    row["tflops"] = round(6 * n * row["tokens_per_s"] / 1e12, 3)
    if peak:
        row["mfu"] = round(6 * n * row["tokens_per_s"] / peak, 3)
        row["targets"] = {"mfu >= 0.40": row["mfu"] >= 0.40}
    return row


def part_mask_overhead(device, dtype, smoke, batch, seq_len, repeats, warmup) -> dict:
    """Masked vs plain training step on the 1.3B shape (bench.sheared_speed.compare)."""
    from bench.sheared_speed import compare

    model = build(make_config(target_shape(smoke), seq_len), device, torch.float32)
    row = compare(model, device, batch, seq_len, repeats, warmup)
    row["targets"] = {"ratio <= 1.3": row["ratio"] <= 1.3}
    return row


def part_decode(device, dtype, smoke, argv: list[str], out: Path) -> dict:
    """The decode table of bench/decode_speed.py (batch 1/8/32, dense and pruned shapes)."""
    from bench.decode_speed import main as decode_main

    path = out / f"gpu_check_decode_{device.type}"
    decode_main(argv + ["--out", str(path)])
    return {"table": path.with_suffix(".md").read_text(), **json.loads(path.with_suffix(".json").read_text())}


def key_figures(name: str, v: dict) -> str:
    """One table cell summarising a part's result."""
    if name == "ppl_scoring":
        return (f"fast {v['seconds']['fast']} s, loop {v['seconds']['loop']} s, {v['speedup']['vs_loop']}x; "
                f"same ranking {all(v['same_ranking'].values())}")
    if name == "sheared_steps":
        return (f"{v['tokens_per_s']} tok/s at {v['micro_batch']} x {v['seq_len']}; peak "
                f"{v.get('peak_allocated_gib', '-')} GiB vs plan {v['plan_estimate_without_runtime_gib']} GiB "
                "(+ runtime)")
    if name == "cpt_step":
        return (f"{v['tokens_per_s']} tok/s, {v['tflops']} TFLOP/s, MFU {v.get('mfu', '-')}, "
                f"peak {v.get('peak_memory_gb', '-')} GB")
    if name == "mask_overhead":
        return f"{v['masked_ms']:.1f} ms vs {v['plain_ms']:.1f} ms: {v['ratio']:.3f}x"
    return "table below"


def write(out: Path, info: dict, results: dict, smoke: bool) -> None:
    """gpu_check.json and gpu_check.md, rewritten after every part."""
    write_json(out / "gpu_check.json", {"machine": info, "smoke": smoke, "parts": results})
    lines = [f"# GPU check{' (smoke, CPU, tiny shapes)' if smoke else ''}", "",
             f"Machine: {info.get('gpu', info['cpu'])}; CUDA {info.get('cuda', '-')}; torch {info['torch']}, "
             f"transformers {info['transformers']}, python {info['python']}.", "",
             "| part | status | seconds | key figures |", "|---|---|---|---|"]
    for name, r in results.items():
        if r["status"] != "ok":
            lines.append(f"| {name} | {r['status']}: {r.get('error', '')} | {r['seconds']} | |")
            continue
        key = key_figures(name, r["result"])
        lines.append(f"| {name} | ok | {r['seconds']} | {key} |")
    if results.get("decode", {}).get("status") == "ok":
        lines += ["", "## Decode (bench.decode_speed)", "", results["decode"]["result"]["table"]]
    with atomic_file(out / "gpu_check.md") as f:
        f.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (seconds)")
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--budget", type=float, default=TOTAL_BUDGET_S, help="seconds for all parts")
    args = parser.parse_args(argv)
    offline()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.smoke:
        raise SystemExit("no CUDA device: run with --smoke for the CPU check")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.out.mkdir(parents=True, exist_ok=True)
    info = machine_info(device)
    deadline = time.monotonic() + args.budget
    results: dict = {}
    for name in args.parts:
        budget, gpu_settings, smoke_settings = PARTS[name]
        settings = smoke_settings if args.smoke else gpu_settings
        remaining = deadline - time.monotonic()
        if remaining < 5:
            results[name] = {"status": "skipped", "error": "no time left", "seconds": 0}
            continue
        print(f"== {name} (budget {min(budget, remaining):.0f} s)", flush=True)
        start = time.perf_counter()
        try:
            with time_budget(min(budget, remaining)):
                fn = globals()[f"part_{name}"]
                result = fn(device, dtype, args.smoke, settings, args.out) if name == "decode" else \
                    fn(device, dtype, args.smoke, **settings)
            results[name] = {"status": "ok", "result": result}
        except Exception as e:  # one part's failure must not lose the others
            traceback.print_exc()
            results[name] = {"status": "failed" if not isinstance(e, PartTimeout) else "timeout",
                             "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
        results[name]["seconds"] = round(time.perf_counter() - start, 1)
        free(device)
        write(args.out, info, results, args.smoke)
        print(f"   {results[name]['status']} in {results[name]['seconds']} s", flush=True)
    print(f"wrote {args.out / 'gpu_check.md'}")


if __name__ == "__main__":
    main()
