"""Stage `speed`: decode and prefill speed of base, pruned and retrained in one run -> reports/speed.json.

The three models are loaded into one process and their timed runs interleaved (shear.speed.
compare_speed), so the speed-ups compare figures taken on the same machine under the same
load; every speed figure of the report comes from this file.
"""
import time

import torch

from shear.io import write_json
from shear.models import architecture, load_model, pick_device, resolve_dtype
from shear.paths import MODEL_NAMES, SPEED, model_dir
from shear.plan import check_speed
from shear.records import REFERENCE_MODEL, SpeedRecord, non_numeric_keys
from shear.speed import compare_speed, machine_info, speedup



def same_weights(a, b) -> bool:
    """Whether two models have the same architecture and equal weights (then one timing serves both)."""
    sa, sb = a.state_dict(), b.state_dict()
    return (architecture(a.config) == architecture(b.config) and sa.keys() == sb.keys()
            and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa))


def main(params, args):
    sp = params.evaluate.speed
    device = pick_device(params.run.device)
    check_speed(params, [model_dir(name) for name in MODEL_NAMES], device)
    dtype = resolve_dtype(params.run.dtype, device)
    started = time.perf_counter()
    models, same_as = {}, {}
    for name in MODEL_NAMES:
        model = load_model(model_dir(name), dtype=dtype, device=device)[0]
        # each distinct model once: retrain `none` copies the pruned weights
        twin = next((other for other, m in models.items() if same_weights(m, model)), None)
        if twin is None:
            models[name] = model
        else:
            same_as[name] = twin
    result = compare_speed(models, device, sp.batch_sizes, sp.prompt_len, sp.new_tokens, sp.repeats,
                           paths=sp.paths or None)
    for name, twin in same_as.items():
        result["models"][name] = {**result["models"][twin], "same_as": twin}
        result["speedup"][name] = speedup(result["models"][twin], result["models"][REFERENCE_MODEL])
    info = machine_info(device)
    info["load_average"] = info["load_average"][0]  # 1-minute; DVC metrics hold numbers, not lists
    info["wall_s"] = round(time.perf_counter() - started, 1)
    record = SpeedRecord(reference=REFERENCE_MODEL, models=result["models"], speedup=result["speedup"], info=info)
    data = record.to_dict()
    bad = non_numeric_keys(data, strings_allowed=("reference", "models", "info"))
    if bad:  # a bug, not user input: dvc metrics diff could not compare these
        raise TypeError(f"{SPEED}: non-numeric values at {', '.join(bad)}")
    write_json(SPEED, data)
    for name in MODEL_NAMES:
        rows = "  ".join(f"batch {b}: {r['tokens_per_s']:.1f} tok/s" for b, r in record.batches(name).items())
        ups = "  ".join(f"x{record.decode_speedup(name, b):.2f}" for b in record.batches(name))
        print(f"speed {name}: {rows}  (decode speed-up {ups})")
    print(f"speed: wrote {SPEED} in {info['wall_s']} s")


if __name__ == "__main__":
    from shear.stage import run_stage

    run_stage(__doc__, main)
