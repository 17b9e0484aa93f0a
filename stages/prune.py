"""Stage `prune`: depth | width | sheared pruning of data/models/base into data/models/pruned/."""
import importlib


def main(params, args):
    # Each method has its own thin stage module: stages/prune_<method>.py
    importlib.import_module(f"stages.prune_{params.prune.method}").main(params, args)


if __name__ == "__main__":
    from shear.stage import run_stage

    run_stage(__doc__, main)
