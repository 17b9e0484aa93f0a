"""Stage `prune`: depth | width | sheared pruning of data/models/base into data/models/pruned/."""
import importlib
from pathlib import Path

CHECKPOINTS, TRAIN_LOG = Path("data/checkpoints/prune"), Path("reports/train/prune")


def main(params, args):
    # Each method has its own thin stage module: stages/prune_<method>.py
    importlib.import_module(f"stages.prune_{params.prune.method}").main(params, args)
    # Declared outs that only sheared pruning fills. Git does not keep empty directories, so a
    # teammate's clone would see the (uncached) training log as deleted without a file in it.
    CHECKPOINTS.mkdir(parents=True, exist_ok=True)
    TRAIN_LOG.mkdir(parents=True, exist_ok=True)
    if not any(TRAIN_LOG.iterdir()):
        (TRAIN_LOG / "README.md").write_text(f"prune.method={params.prune.method} does not train; no log.\n")


if __name__ == "__main__":
    from shear.stage import run_stage

    run_stage(__doc__, main)
