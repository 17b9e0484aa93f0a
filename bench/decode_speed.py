"""Decode speed of dense, depth-pruned and width-pruned models, against floors and the ideal.

Variants (random weights: speed does not depend on their values):
  dense          the source shape
  depth-20%      round(0.20 * layers) blocks removed with shear.prune.depth.remove_blocks
  depth-35%      round(0.35 * layers) blocks removed
  width-20%      the shape the planner (shear.prune.shapes.resolve_target) picks for the
                 depth-20% model's non-embedding parameter count, with align=64
  width-20%-a1   the same budget with align=1 (no rounding): the uneven-shape case

On CUDA the source is the LLaMA-2-7B shape in bf16; on CPU the default model's shape
(SmolLM2-135M) in float32. Each variant goes through `shear.speed.measure_speed` (static KV
cache, compiled decode on CUDA, path chosen by measurement) and, for comparison, plain
`model.generate`. Writes bench/results/decode_speed_<device>.{json,md}.

    python -m bench.decode_speed                       # CUDA when present, else CPU
    python -m bench.decode_speed --device cpu --batch-sizes 1 4 --new-tokens 8
"""
from __future__ import annotations

import argparse
import gc
from pathlib import Path

import torch

from shear.io import atomic_file, write_json
from shear.models import count_parameters, offline
from shear.prune.depth import remove_blocks
from shear.prune.shapes import resolve_target, shape_parameters
from shear.speed import ideal_speedup, machine_info, measure_speed, speedup

RESULTS = Path(__file__).resolve().parent / "results"

SHAPES = {
    "llama2-7b": {"num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 32,
                  "intermediate_size": 11008, "head_dim": 128, "vocab_size": 32000, "tie_word_embeddings": False,
                  "rope_theta": 10000.0},
    "smollm2-135m": {"num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
                     "intermediate_size": 1536, "head_dim": 64, "vocab_size": 49152, "tie_word_embeddings": True,
                     "rope_theta": 100000.0},
    # for tests: runs in seconds
    "tiny": {"num_hidden_layers": 6, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 128, "head_dim": 16, "vocab_size": 320, "tie_word_embeddings": True,
             "rope_theta": 10000.0},
}


def make_config(shape: dict, max_len: int):
    """A LlamaConfig of `shape` (explicit head_dim, as width-pruned configs need)."""
    from transformers import LlamaConfig

    return LlamaConfig(**shape, max_position_embeddings=max(4096, max_len), rms_norm_eps=1e-5,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0, architectures=["LlamaForCausalLM"])


def build(config, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A random-weight LlamaForCausalLM made directly on `device` in `dtype`."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    return model


def depth_drop(layers: int, ratio: float) -> list[int]:
    """round(ratio * layers) blocks, taken just before the last two (Shortened LLaMA keeps the
    first four and the last two); which blocks does not matter for speed."""
    n = int(ratio * layers + 0.5)
    return list(range(layers - 2 - n, layers - 2))


def variants(source: dict, max_len: int):
    """(name, config, blocks to drop) for every variant, the dense config first."""
    config = make_config(source, max_len)
    layers = source["num_hidden_layers"]
    out = [("dense", config, [])]
    for ratio in (0.20, 0.35):
        # a config of its own: remove_blocks updates the model's config in place
        out.append((f"depth-{round(ratio * 100)}%", make_config(source, max_len), depth_drop(layers, ratio)))
    # the width models get the depth-20% model's non-embedding parameter count
    depth20 = {**source, "num_hidden_layers": layers - len(depth_drop(layers, 0.20))}
    budget = shape_parameters(depth20, source["vocab_size"], source["tie_word_embeddings"])["non_embedding"]
    for align, name in ((64, "width-20%"), (1, "width-20%-a1")):
        shape = resolve_target(config, {"params": budget}, align)
        out.append((name, make_config({**source, **shape}, max_len), []))
    return out


def shape_text(config) -> str:
    return (f"L{config.num_hidden_layers} h{config.hidden_size} H{config.num_attention_heads}/"
            f"{config.num_key_value_heads} mlp{config.intermediate_size}")


def table(results: list[dict]) -> str:
    """Markdown: one row per variant and batch size."""
    head = ("| variant | shape | non-emb params | batch | path | prefill ms | decode ms/token | tokens/s | "
            "decode floor ms | ratio to floor | speed-up vs dense | ideal | speed-up / ideal | spread | "
            "generate ms/token | fast / generate |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        speed = r["speed"]
        for key, row in speed["batch"].items():
            base = r.get("speedup", {}).get(key, {})
            gen = speed.get("baseline", {}).get(key, {})
            lines.append(
                f"| {r['variant']} | {r['shape']} | {r['non_embedding_params'] / 1e6:.1f}M | {key[2:]} | {speed['path']} "
                f"| {row['prefill_ms']:.1f} | {row['decode_ms_per_token']:.2f} | {row['tokens_per_s']:.1f} "
                f"| {row['decode_floor_ms']:.2f} | {row['decode_ratio_to_floor']:.2f} "
                f"| {base.get('decode', float('nan')):.3f} | {r['ideal']:.3f} | {base.get('decode_vs_ideal', float('nan')):.3f} "
                f"| {row['decode_spread']:.1%} | {gen.get('decode_ms_per_token', float('nan')):.2f} "
                f"| {row.get('speedup_over_generate', float('nan')):.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--shape", choices=sorted(SHAPES), help="source shape (default: llama2-7b on CUDA, smollm2-135m on CPU)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="default: 1 8 32 on CUDA, 1 4 on CPU")
    parser.add_argument("--prompt-len", type=int, help="default: 128 on CUDA, 32 on CPU")
    parser.add_argument("--new-tokens", type=int, help="default: 64 on CUDA, 8 on CPU")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--paths", nargs="+", choices=["compiled", "generate_static", "eager"],
                        help="decode paths to try (default: shear.speed.default_paths)")
    parser.add_argument("--variants", nargs="+", help="only these variants (dense always runs: it is the reference)")
    parser.add_argument("--no-baseline", action="store_true", help="skip timing plain model.generate")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--out", help="output path without suffix (default: bench/results/decode_speed_<device>)")
    args = parser.parse_args(argv)
    offline()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    source = SHAPES[args.shape or ("llama2-7b" if cuda else "smollm2-135m")]
    batch_sizes = args.batch_sizes or ([1, 8, 32] if cuda else [1, 4])
    prompt_len = args.prompt_len or (128 if cuda else 32)
    new_tokens = args.new_tokens or (64 if cuda else 8)

    results, dense = [], None
    for name, config, drop in variants(source, prompt_len + new_tokens):
        if args.variants and name != "dense" and name not in args.variants:
            continue
        print(f"== {name}", flush=True)
        model = build(config, device, dtype)
        if drop:
            remove_blocks(model, drop)
        speed = measure_speed(model, device, batch_sizes, prompt_len, new_tokens, args.repeats,
                              paths=args.paths, baseline=not args.no_baseline)
        entry = {"variant": name, "shape": shape_text(model.config), "dropped_blocks": drop,
                 "non_embedding_params": count_parameters(model)["non_embedding"], "speed": speed}
        del model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        if dense is None:
            dense = entry
        entry["ideal"] = ideal_speedup(dense["non_embedding_params"], entry["non_embedding_params"])
        entry["speedup"] = speedup(speed, dense["speed"])
        results.append(entry)
        for key, row in speed["batch"].items():
            print(f"   {key}: {speed['path']} decode {row['decode_ms_per_token']:.2f} ms/token "
                  f"(floor {row['decode_floor_ms']:.2f}, x{row['decode_ratio_to_floor']:.2f}), "
                  f"prefill {row['prefill_ms']:.1f} ms, spread {row['decode_spread']:.1%}", flush=True)

    info = machine_info(device)
    settings = {"batch_sizes": batch_sizes, "prompt_len": prompt_len, "new_tokens": new_tokens,
                "repeats": args.repeats, "dtype": str(dtype).removeprefix("torch.")}
    out = Path(args.out) if args.out else RESULTS / f"decode_speed_{device.type}"
    write_json(out.with_suffix(".json"), {"machine": info, "settings": settings, "results": results})
    first = results[0]["speed"]
    md = (f"# Decode speed ({device.type})\n\n"
          f"Machine: {info.get('gpu', info['cpu'])}; torch {info['torch']}, transformers {info['transformers']}; "
          f"{info['torch_threads']} threads.\n"
          f"Settings: prompt {prompt_len} tokens, {new_tokens} new tokens (greedy, no EOS stop), "
          f"{args.repeats} repeats (median), {settings['dtype']}, random weights.\n"
          f"Measured: memory bandwidth {first['bandwidth_gb_s']:.1f} GB/s, matmul {first['matmul_tflops']:.3f} TFLOP/s.\n"
          f"Floor = (weights + KV cache read per step) / bandwidth (or FLOPs / matmul rate if larger). "
          f"Ideal speed-up = dense / pruned non-embedding parameters. "
          f"`generate` = plain `model.generate` (dynamic cache, eager), the straightforward way.\n\n"
          + table(results))
    for r in results:
        md += f"\n{r['variant']}: path candidates {r['speed']['candidates']}"
    with atomic_file(out.with_suffix(".md")) as f:
        f.write(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
