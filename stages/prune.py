"""Stage `prune`: depth | width | sheared pruning of data/models/base into data/models/pruned/."""
from shear.paths import PRUNE_CHECKPOINTS, PRUNE_LOGS
from stages import prune_depth, prune_sheared, prune_width

# prune.method -> its thin stage module's main(params, args)
METHODS = {"depth": prune_depth.main, "width": prune_width.main, "sheared": prune_sheared.main}


def main(params, args):
    METHODS[params.prune.method](params, args)
    # Declared outs that only sheared pruning fills. Git does not keep empty directories, so a
    # teammate's clone would see the (uncached) training log as deleted without a file in it.
    PRUNE_CHECKPOINTS.mkdir(parents=True, exist_ok=True)
    PRUNE_LOGS.mkdir(parents=True, exist_ok=True)
    if not any(PRUNE_LOGS.iterdir()):
        (PRUNE_LOGS / "README.md").write_text(f"prune.method={params.prune.method} does not train; no log.\n")


if __name__ == "__main__":
    from shear.models import return_freed_memory
    from shear.stage import run_stage

    return_freed_memory()  # a training stage: its peak RSS is what shear.plan counts (see the docstring)
    run_stage(__doc__, main)
