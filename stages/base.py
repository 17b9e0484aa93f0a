"""Stage `base`: load the model source and save it as a standard checkpoint in data/models/base/."""
from shear.models import load_source, save_model

OUT = "data/models/base"


def main(params, args):
    model, tokenizer, origin = load_source(params.base.source, seed=params.run.seed)
    info = save_model(model, tokenizer, OUT, {"method": "base", **origin})
    counts = info["parameters"]
    print(f"base: {params.base.source} -> {OUT} ({counts['total']:,} parameters, "
          f"{counts['non_embedding']:,} non-embedding)")


if __name__ == "__main__":
    from shear.stage import run_stage

    run_stage(__doc__, main)
