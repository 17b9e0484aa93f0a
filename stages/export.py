"""Stage `export`: the models in export.models as GGUF files in export.formats -> data/export/,
and what a llama.cpp user gets from them -> reports/export/metrics.json.

Per model and format: file size, tensors kept in f16, the transformers GGUF reader's logits
next to the checkpoint's, and with llama.cpp (llama-cpp-python, CPU, export.threads threads):
perplexity on the eval split next to the pipeline's at the same length, the greedy
continuation next to transformers', batch-1 prompt and decode tokens/s, the speed-up over
the base model in the same format and over the ideal (dense / pruned non-embedding
parameters). The base model is measured in every format even when it is not exported.
"""
import importlib.util
import tempfile
from pathlib import Path

from shear.data import calibration_batch
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
from shear.io import atomic_dir, write_json
from shear.models import count_parameters, load_model
from shear.paths import EXPORT, EXPORT_METRICS, SHARDS, model_dir
from shear.speed import ideal_speedup, machine_info


def main(params, args):
    ex = params.export
    has_llama_cpp = importlib.util.find_spec("llama_cpp") is not None
    if not has_llama_cpp:
        print("export: llama-cpp-python is not installed (`make setup-python` builds it); writing files without llama.cpp figures")
    names = ["base"] + [m for m in ex.models if m != "base"]
    metrics, dense = {}, None
    with atomic_dir(EXPORT) as out, tempfile.TemporaryDirectory() as scratch:
        for name in names:
            model, tokenizer, record = load_model(model_dir(name))
            non_embedding = count_parameters(model)["non_embedding"]
            dense = dense or non_embedding
            rows = calibration_batch(SHARDS, ex.ppl_sequences, ex.ppl_seq_len, tokenizer, split="eval")
            bos = tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None
            prompt = rows[0, : ex.speed.greedy_prompt_tokens].tolist()
            entry = {"non_embedding_params": non_embedding, "ideal_speedup": ideal_speedup(dense, non_embedding)}
            # the checkpoint's perplexity on these rows: one figure for every format's comparison
            pipeline_ppl = perplexity(model, rows, batch_size=8, bos_token_id=bos)["ppl"] if has_llama_cpp else None
            for fmt in ex.formats:
                folder = out if name in ex.models else Path(scratch)
                path = folder / f"{name}-{fmt}.gguf"
                info = export_gguf(model, tokenizer, path, fmt, record, name=f"shear-{name}")
                reread = read_gguf(path)  # read back once for the logits and the greedy check
                row = {"file_bytes": info["bytes"], "f16_fallback_tensors": len(info["f16_fallback"]),
                       "reread_logits_rel_error": reread_logits_error(model, path, rows[:2], reread=reread)}
                if has_llama_cpp:
                    sp = ex.speed
                    row |= check_file(path, pipeline_ppl, reread, rows, bos, ex.threads, prompt, sp.new_tokens)
                    llm = open_llama_cpp(path, ex.threads, n_ctx=sp.prompt_tokens + sp.new_tokens + 8)
                    row |= speed_summary(llama_cpp_speed_runs(llm, sp.prompt_tokens, sp.new_tokens, sp.repeats,
                                                              model.config.vocab_size))
                    llm.close()
                    if name != "base":
                        base = metrics["base"][fmt]
                        for kind in ("decode", "prompt"):
                            row[f"{kind}_speedup"] = row[f"{kind}_tokens_per_s"] / base[f"{kind}_tokens_per_s"]
                        row["decode_speedup_of_ideal"] = row["decode_speedup"] / entry["ideal_speedup"]
                entry[fmt] = row
                print(f"export {name} {fmt}: {info['bytes'] / 2**20:.1f} MiB, reread error {row['reread_logits_rel_error']:.2e}"
                      + (f", llama.cpp ppl {row['ppl_llama_cpp']:.3f} vs {row['ppl_pipeline']:.3f}, "
                         f"decode {row['decode_tokens_per_s']:.1f} tok/s, prompt {row['prompt_tokens_per_s']:.1f} tok/s"
                         if has_llama_cpp else ""))
            metrics[name] = entry
    metrics["info"] = {"machine": machine_info("cpu"), "threads": ex.threads, "ppl_seq_len": ex.ppl_seq_len,
                       "ppl_bos": "yes" if bos is not None else "no",
                       "llama_cpp": _llama_cpp_version() if has_llama_cpp else "not installed"}
    write_json(EXPORT_METRICS, metrics)
    print(f"export: wrote {EXPORT}/ ({', '.join(f'{m}-{f}' for m in ex.models for f in ex.formats)}) and {EXPORT_METRICS}")


def _llama_cpp_version() -> str:
    import llama_cpp

    return llama_cpp.__version__


if __name__ == "__main__":
    from shear.stage import run_stage

    run_stage(__doc__, main)
