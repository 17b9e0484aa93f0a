"""Stage `evaluate <base|pruned|retrained>`: perplexity and lm-eval tasks -> reports/eval/<model>/metrics.json.

For pruned and retrained models `retention` compares quality with reports/eval/base/metrics.json.
Speed is not measured here: the `speed` stage times every model in one run.
"""
import time

import torch
import transformers

from shear.data import load_domains
from shear.evaluate import domain_perplexity, retention, run_tasks, tokenizer_adds_bos
from shear.io import read_json, write_json
from shear.models import count_parameters, load_model, pick_device, resolve_dtype
from shear.paths import HELDOUT, MODEL_NAMES, SHARDS, metrics_file, model_dir
from shear.plan import check_stage
from shear.records import REFERENCE_MODEL, EvalMetrics, ParameterCounts, non_numeric_keys


def main(params, args):
    ev, name = params.evaluate, args.model
    device = pick_device(params.run.device)
    check_stage("evaluate", params, model_dir(name), device)
    started = time.perf_counter()
    dtype = resolve_dtype(params.run.dtype, device)
    model, tokenizer, _ = load_model(model_dir(name), dtype=dtype, device=device)
    eval_splits = load_domains(SHARDS, "eval", tokenizer)  # refuses shards of another tokenizer
    bos = tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None

    ppl = domain_perplexity(model, eval_splits, ev.ppl_seq_lens, ev.ppl_max_tokens, ev.batch_size, bos)
    metrics = EvalMetrics(params=ParameterCounts(**count_parameters(model)), ppl=ppl["ppl"], loss=ppl["loss"],
                          ppl_protocol=ppl["ppl_protocol"])
    metrics.tasks = run_tasks(model, tokenizer, ev.tasks, HELDOUT, ev.task_limit, ev.batch_size, params.run.seed)
    if name != REFERENCE_MODEL:
        metrics.retention = retention(metrics.to_dict(), read_json(metrics_file(REFERENCE_MODEL)))
    metrics.info = {
        "model": name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),  # of the weights
        "ppl_dtype": "float32",  # of the log-softmax and the loss sums (shear.nll), whatever the weights'
        "ppl_mean": "exp(mean over domains of the per-domain loss)",
        "bos_token": tokenizer.bos_token if bos is not None else "none",
        "wall_s": round(time.perf_counter() - started, 1),
    }
    data = metrics.to_dict()
    bad = non_numeric_keys(data)
    if bad:  # a bug, not user input: dvc metrics diff could not compare these
        raise TypeError(f"metrics.json: non-numeric values at {', '.join(bad)}")
    write_json(metrics_file(name), data)

    for length, values in metrics.ppl.items():
        print(f"evaluate {name}: ppl@{length} " + "  ".join(f"{d}={v:.2f}" for d, v in values.items()))
    for task, values in metrics.tasks.items():
        print(f"evaluate {name}: {task} acc={values.get('acc', float('nan')):.3f} "
              f"± {values.get('acc_stderr', float('nan')):.3f} (n={values.get('n')})")
    print(f"evaluate {name}: wrote {metrics_file(name)} in {metrics.info['wall_s']} s")


def add_arguments(parser):
    parser.add_argument("model", choices=MODEL_NAMES, help="which model of data/models/ to evaluate")


if __name__ == "__main__":
    from shear.stage import run_stage

    run_stage(__doc__, main, add_arguments)
