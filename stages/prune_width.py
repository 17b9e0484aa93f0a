"""Width pruning (prune.method=width): one-shot uniform pruning of data/models/base to prune.target.

Keeps the most important query heads / KV groups, MLP neurons and hidden channels by
data/scores/width_<prune.width.criterion>.safetensors, the same number in every layer, and
drops the least important layers when the target has fewer; writes data/models/pruned/.
"""
import dataclasses

from shear.errors import ShearError
from shear.importance.width import read_width_scores
from shear.models import count_parameters, load_model, pick_device, resolve_dtype, save_model
from shear.paths import BASE_MODEL, PRUNED_MODEL, SCORE_TENSORS
from shear.plan import check_stage
from shear.prune.shapes import resolve_target, source_shape
from shear.prune.width import width_prune


def main(params, args):
    prune = params.prune
    device = pick_device(params.run.device)
    check_stage("prune", params, BASE_MODEL, device)
    model, tokenizer, base_record = load_model(BASE_MODEL, dtype=resolve_dtype(params.run.dtype, device), device=device)
    target_keys = {k: v for k, v in dataclasses.asdict(prune.target).items() if k != "align"}
    target = resolve_target(model.config, target_keys, prune.target.align, prune.target.tp_divisible)

    criterion = prune.width.criterion
    scores_path = SCORE_TENSORS / f"width_{criterion}.safetensors"
    if not scores_path.is_file():
        raise ShearError(f"{scores_path}: not found; add {criterion} to score.width_criteria "
                         "and run the score stage (dvc repro score)")
    scores = read_width_scores(scores_path)
    src = source_shape(model.config)
    expected = {"heads": (src["num_hidden_layers"], src["num_attention_heads"]),
                "mlp": (src["num_hidden_layers"], src["intermediate_size"]), "hidden": (src["hidden_size"],)}
    if any(tuple(scores[k].shape) != shape for k, shape in expected.items()):
        raise ShearError(f"{scores_path}: scores were computed for another model than {BASE_MODEL}; "
                         "re-run the score stage (dvc repro score)")

    before = count_parameters(model)
    model, record = width_prune(model, target, scores)
    info = save_model(model, tokenizer, PRUNED_MODEL, {
        **record,
        "source": base_record.get("source"),
        "criterion": criterion,
        "scores_file": str(scores_path),
        "align": prune.target.align,
        "requested_target": {k: v for k, v in target_keys.items() if v is not None},
        "parameters_before": before,
    })
    after = info["parameters"]
    dropped = f", dropped layers {record['removed_layers']}" if record["removed_layers"] else ""
    print(f"prune: width/{criterion} -> {', '.join(f'{k}={v}' for k, v in target.items())}{dropped}: "
          f"{before['non_embedding']:,} -> {after['non_embedding']:,} non-embedding parameters "
          f"({before['total']:,} -> {after['total']:,} total)")


if __name__ == "__main__":
    from shear.stage import run_stage

    run_stage(__doc__, main)
