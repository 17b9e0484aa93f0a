"""Stage `evaluate <base|pruned|retrained>`: perplexity, lm-eval tasks, speed -> reports/eval/<model>/metrics.json.

For pruned and retrained models the base model's speed is measured again in the same run
(same machine, same load) for `speedup`, and `retention` compares quality with
reports/eval/base/metrics.json.
"""
import gc
import time

import torch
import transformers

from shear.data import load_domains
from shear.evaluate import domain_perplexity, non_numeric_keys, retention, run_tasks, tokenizer_adds_bos
from shear.io import read_json, write_json
from shear.models import count_parameters, load_model, pick_device
from shear.speed import measure_speed, speedup

MODELS, SHARDS, HELDOUT, REPORTS = "data/models", "data/shards", "data/heldout", "reports/eval"
NAMES = ("base", "pruned", "retrained")


def speed_of(model, device, sp) -> dict:
    """The speed section of metrics.json (shear.speed's decode/prefill benchmark)."""
    return measure_speed(model, device, batch_sizes=sp.batch_sizes, prompt_len=sp.prompt_len,
                         new_tokens=sp.new_tokens, repeats=sp.repeats, paths=sp.paths or None)


def main(params, args):
    ev, name = params.evaluate, args.model
    device = pick_device(params.run.device)
    started = time.perf_counter()
    model, tokenizer, _ = load_model(f"{MODELS}/{name}", device=device)
    eval_splits = load_domains(SHARDS, "eval", tokenizer)  # refuses shards of another tokenizer
    bos = tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None

    metrics = {"params": count_parameters(model)}
    metrics |= domain_perplexity(model, eval_splits, ev.ppl_seq_lens, ev.ppl_max_tokens, ev.batch_size, bos)
    metrics["tasks"] = run_tasks(model, tokenizer, ev.tasks, HELDOUT, ev.task_limit, ev.batch_size,
                                 params.run.seed)
    # Speed last: measure_speed turns the model to bf16 in place on CUDA.
    metrics["speed"] = speed_of(model, device, ev.speed)
    if name != "base":
        metrics["retention"] = retention(metrics, read_json(f"{REPORTS}/base/metrics.json"))
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        base_model, _, _ = load_model(f"{MODELS}/base", device=device)
        metrics["speedup"] = speedup(metrics["speed"], speed_of(base_model, device, ev.speed))
    metrics["info"] = {
        "model": name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "ppl_dtype": "float32",
        "ppl_mean": "exp(mean over domains of the per-domain loss)",
        "bos_token": tokenizer.bos_token if bos is not None else "none",
        "wall_s": round(time.perf_counter() - started, 1),
    }
    bad = non_numeric_keys(metrics)
    if bad:  # a bug, not user input: dvc metrics diff could not compare these
        raise TypeError(f"metrics.json: non-numeric values at {', '.join(bad)}")
    write_json(f"{REPORTS}/{name}/metrics.json", metrics)

    for length, values in metrics["ppl"].items():
        print(f"evaluate {name}: ppl@{length} " + "  ".join(f"{d}={v:.2f}" for d, v in values.items()))
    for task, values in metrics["tasks"].items():
        print(f"evaluate {name}: {task} acc={values.get('acc', float('nan')):.3f} "
              f"± {values.get('acc_stderr', float('nan')):.3f} (n={values.get('n')})")
    print(f"evaluate {name}: wrote {REPORTS}/{name}/metrics.json in {metrics['info']['wall_s']} s")


def add_arguments(parser):
    parser.add_argument("model", choices=NAMES, help="which model of data/models/ to evaluate")


if __name__ == "__main__":
    from shear.stage import run_stage

    run_stage(__doc__, main, add_arguments)
