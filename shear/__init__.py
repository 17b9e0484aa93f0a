"""shear: structured pruning, retraining and evaluation of LLaMA-family models."""
