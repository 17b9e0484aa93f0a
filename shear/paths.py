"""Where the pipeline's stages read and write, written once.

Paths are relative to the repository root, where DVC runs every stage. dvc.yaml names the
same paths in each stage's deps and outs (it cannot import them); tests/test_stage_deps.py
checks that every path here is one of dvc.yaml's.
"""
from pathlib import Path

MODELS = Path("data/models")
MODEL_NAMES = ("base", "pruned", "retrained")  # the models of data/models/, in pipeline order
BASE_MODEL = MODELS / "base"
PRUNED_MODEL = MODELS / "pruned"
RETRAINED_MODEL = MODELS / "retrained"

RAW = Path("data/raw")  # corpus: <domain>.jsonl
HELDOUT = Path("data/heldout")  # corpus: documents kept out of data/raw for the lm-eval tasks
SHARDS = Path("data/shards")  # shards: <domain>/{train,calib,eval} and manifest.json
CORPUS_REPORT = Path("reports/corpus.json")

SCORES = Path("reports/scores")  # score: block_<criterion>.json, width_<criterion>.json summaries, plots
SCORE_TENSORS = Path("data/scores")  # score: width_<criterion>.safetensors (DVC-cached)
EVAL = Path("reports/eval")  # evaluate: <model>/metrics.json
BASE_METRICS = EVAL / "base" / "metrics.json"

PRUNE_CHECKPOINTS = Path("data/checkpoints/prune")  # sheared pruning's resumable state
PRUNE_LOGS = Path("reports/train/prune")  # its DVCLive logs
RETRAIN_CHECKPOINTS = Path("data/checkpoints/retrain")
RETRAIN_LOGS = Path("reports/train/retrain")

SPEED = Path("reports/speed.json")  # speed: every model's decode/prefill figures from one run
EXPORT = Path("data/export")  # export: <model>-<format>.gguf
EXPORT_METRICS = Path("reports/export/metrics.json")  # export: file sizes, llama.cpp ppl and speed
REPORT = Path("reports/report.md")
FIGURES = Path("reports/figures")


def model_dir(name: str) -> Path:
    """data/models/<name>: one of MODEL_NAMES."""
    return MODELS / name


def metrics_file(name: str) -> Path:
    """reports/eval/<name>/metrics.json: the evaluate stage's metrics of model `name`."""
    return EVAL / name / "metrics.json"

# The params stage: the stamp every stage depends on, and the resolved settings of the
# stages whose keys depend on the method (shear.config.STAGE_SETTINGS).
PARAMS_CHECKED = Path("reports/params/checked.json")


def settings_file(stage: str) -> Path:
    """reports/params/<stage>.json: the settings `stage` reads, written by the params stage."""
    return PARAMS_CHECKED.parent / f"{stage}.json"
