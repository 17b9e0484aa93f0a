"""Bad inputs and faults through the real stages: the table of issue 14's closing note.

Builds a tiny pipeline once in a temporary directory (`python -m stages.X` for base, corpus,
shards, score, prune, retrain), then for each case copies it, makes one thing wrong (a params
value, a damaged or missing file, a planted pickle), runs the stage as a user would and checks
the promise: exit code 1, exactly one line on stderr starting with "error: ", no traceback, and
every file of the copy byte for byte as before. A second, shorter table lists faults a stage
recovers from by itself (a killed run's leftovers): exit 0 and the leftovers gone.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.bad_inputs     # writes bench/results/bad_inputs.md
"""
from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import yaml

from tests.conftest import REPO, full_params, stdlib_texts

TINY = "tiny:layers=4,hidden=64,heads=4,kv_heads=2,mlp=128"
# The pipeline of tests/test_pipeline.py, smaller: one built-in domain and one user source.
PARAMS = {
    "run": {"seed": 0, "device": "cpu"},
    "base": {"source": TINY},
    "corpus": {"domains": ["code"], "max_chars_per_domain": 100_000, "heldout_docs": 5,
               "user_sources": [{"domain": "books", "path": "texts/*.txt", "format": "text", "license": "PSF-2.0"}]},
    "shards": {"seq_len": 64, "calib_fraction": 0.1, "eval_fraction": 0.1, "max_tokens_per_domain": 40_000},
    "score": {"block_criteria": ["ppl"], "width_criteria": ["magnitude"], "calib_sequences": 4, "calib_seq_len": 32,
              "batch_size": 4, "keep_first": 1, "keep_last": 1},
    "prune": {"method": "depth", "depth": {"criterion": "ppl", "ratio": 0.25}},
    "retrain": {"method": "lora", "tokens": 512, "batch_size": 2, "seq_len": 32, "checkpoint_every": 4,
                "eval_every": 8},
    "mixture": {"eval_sequences": 2},
    "evaluate": {"ppl_seq_lens": [32, 64], "ppl_max_tokens": 1024, "batch_size": 4, "tasks": ["shear_lastword"],
                 "task_limit": 4, "speed": {"batch_sizes": [1], "prompt_len": 8, "new_tokens": 4, "repeats": 1}},
}
SETUP_STAGES = ("base", "corpus", "shards", "score", "prune", "retrain")


class Payload:
    """Unpickling this creates the file `marker`: proof that code ran from a data file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@dataclass
class Case:
    """One bad input: what is wrong, the stage run, how the copy is changed."""
    name: str
    stage: str
    params: dict = field(default_factory=dict)  # overrides of PARAMS
    text: str | None = None  # the whole params file instead (bad YAML, empty, partial)
    damage: Callable[[Path], None] | None = None
    args: tuple[str, ...] = ()


def run(ws: Path, stage: str, args=(), timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m stages.<stage>` in the workspace, on one thread, offline."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", f"stages.{stage}", *args], cwd=ws, env=env, capture_output=True,
                          text=True, timeout=timeout)


def write_params(ws: Path, overrides: dict | None = None, text: str | None = None) -> None:
    """params.yaml: the tiny pipeline with `overrides`, or `text` as it is."""
    params = full_params(PARAMS)
    if overrides:
        params = merge(params, overrides)
    (ws / "params.yaml").write_text(text if text is not None else yaml.safe_dump(params))


def merge(base: dict, changes: dict) -> dict:
    """`base` with `changes` applied key by key (nested dicts merged, anything else replaced)."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def build_workspace(ws: Path) -> None:
    """Run the tiny pipeline's stages once: the outputs every case must leave untouched."""
    (ws / "texts").mkdir(parents=True)
    for i, text in enumerate(stdlib_texts(20)):
        lines = [ln.strip(" #") for ln in text.splitlines() if ln.strip().startswith(("#", '"""')) or ln[:1].isalpha()]
        (ws / "texts" / f"{i:02d}.txt").write_text("\n".join(lines) + "\n")
    write_params(ws)
    for stage in SETUP_STAGES:
        done = run(ws, stage)
        if done.returncode != 0:
            sys.exit(f"setup: stage {stage} failed:\n{done.stderr[-3000:]}")


def snapshot(ws: Path) -> dict[str, str]:
    """Every file of the workspace -> sha256 of its bytes."""
    return {p.relative_to(ws).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(ws.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


# ----------------------------------------------------------------------------- damage helpers


def truncate(path: Path) -> None:
    """Cut a file to half its length (an interrupted copy or download)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garbage(path: Path) -> None:
    """Overwrite a file with bytes of no format."""
    path.write_bytes(b"\x00garbage\xff" * 64)


def remove(path: Path) -> None:
    """Delete a file or directory."""
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def copy_as_hf_source(ws: Path, damage: Callable[[Path], None]) -> None:
    """A user's `hf:` directory (my-model/, the base checkpoint without shear.json), then damaged."""
    shutil.copytree(ws / "data/models/base", ws / "my-model")
    (ws / "my-model/shear.json").unlink()
    damage(ws / "my-model")


def exported_gguf(ws: Path, keep: int | None) -> None:
    """model.gguf: the base model exported to f16, cut to `keep` bytes (None: half)."""
    from shear.export import export_gguf
    from shear.models import load_model

    model, tok, _ = load_model(ws / "data/models/base")
    export_gguf(model, tok, ws / "model.gguf", "f16")
    data = (ws / "model.gguf").read_bytes()
    (ws / "model.gguf").write_bytes(data[: len(data) // 2 if keep is None else keep])


def planted_pickle(path: Path) -> None:
    """Replace a checkpoint file with a pickle that would create `pwned` next to it if loaded."""
    path.write_bytes(pickle.dumps(Payload(path.parent / "pwned")))


def retrain_shard(ws: Path) -> Path:
    """The first tensor file of the retrain checkpoint."""
    return sorted((ws / "data/checkpoints/retrain/last").glob("tensors-*.safetensors"))[0]


def latin1_source(ws: Path) -> None:
    (ws / "texts/latin1.txt").write_bytes(("Gr\u00fc\u00dfe aus K\u00f6ln " * 20).encode("latin-1"))


def no_tokenizer(d: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (d / name).unlink()


BASE = "data/models/base"
DEPTH = {"prune": {"depth": {"criterion": "ppl"}}}
CASES = [
    # params.yaml itself
    Case("params.yaml empty", "prune", text=""),
    Case("params.yaml only comments", "prune", text="# nothing\n"),
    Case("params.yaml not YAML", "prune", text="run: {seed: [0\n"),
    Case("params.yaml a list, not a mapping", "prune", text="- run\n- base\n"),
    Case("params.yaml partial (prune only)", "prune", text=yaml.safe_dump({"prune": full_params(PARAMS)["prune"]})),
    Case("--params file missing", "prune", args=("--params", "nope.yaml")),
    Case("misspelled section retrian:", "prune", params={"retrian": {"tokens": 1}}),
    Case("misspelled section under the params stage", "params", params={"retrian": {"tokens": 1}}),
    Case("old flat key prune.criterion", "prune", params={"prune": {"criterion": "ppl"}}),
    Case("old key base.seed", "base", params={"base": {"seed": 1}}),
    # wrong types and values
    Case("run.seed: 'zero' (wrong type)", "prune", params={"run": {"seed": "zero"}}),
    Case("run.dtype: fp16", "prune", params={"run": {"dtype": "fp16"}}),
    Case("run.device: tpu", "prune", params={"run": {"device": "tpu"}}),
    Case("run.device: cuda without a GPU", "prune", params={"run": {"device": "cuda"}}),
    Case("prune.method: magic", "prune", params={"prune": {"method": "magic"}}),
    Case("prune.depth.ratio: 1.5 (out of range)", "prune", params={"prune": {"depth": {"ratio": 1.5}}}),
    Case("prune.depth.ratio: 'a lot' (wrong type)", "prune", params={"prune": {"depth": {"ratio": "a lot"}}}),
    Case("prune.depth.mode: twice", "prune", params={"prune": {"depth": {"mode": "twice"}}}),
    Case("prune.depth.criterion not scored", "prune",
         params={"prune": {"depth": {"criterion": "ppl+"}}, "score": {"block_criteria": ["ppl"]}}),
    Case("prune.width.criterion not scored", "prune",
         params={"prune": {"method": "width", "width": {"criterion": "taylor"}}, "score": {"width_criteria": []}}),
    Case("dynamic mixture without 128 in ppl_seq_lens", "prune",
         params={"data": {"mixture": "dynamic"}, "evaluate": {"ppl_seq_lens": [64]}}),
    Case("retrain.tokens: 10 (below one step)", "retrain", params={"retrain": {"tokens": 10}}),
    Case("retrain.tokens: -5", "retrain", params={"retrain": {"tokens": -5}}),
    Case("retrain.seq_len: 4096 (past the positions)", "retrain",
         params={"retrain": {"seq_len": 4096, "tokens": 1 << 20}}),
    Case("retrain.method: sgd", "retrain", params={"retrain": {"method": "sgd"}}),
    Case("retrain.lora.target_modules: [qkv_proj]", "retrain",
         params={"retrain": {"lora": {"target_modules": ["q_proj", "qkv_proj"]}}}),
    Case("export.formats: [q3_k]", "export", params={"export": {"formats": ["q3_k"]}}),
    # model sources (base stage)
    Case("base.source: s3:bucket", "base", params={"base": {"source": "s3:bucket"}}),
    Case("base.source: tiny:layers=x", "base", params={"base": {"source": "tiny:layers=x"}}),
    Case("base.source: gguf: file missing", "base", params={"base": {"source": "gguf:missing.gguf"}}),
    Case("base.source: gguf: package not installed", "base", params={"base": {"source": "gguf:no_such_package"}}),
    Case("truncated GGUF (header)", "base", params={"base": {"source": "gguf:model.gguf"}},
         damage=lambda ws: exported_gguf(ws, 10)),
    Case("truncated GGUF (metadata)", "base", params={"base": {"source": "gguf:model.gguf"}},
         damage=lambda ws: exported_gguf(ws, 200)),
    Case("truncated GGUF (tensors)", "base", params={"base": {"source": "gguf:model.gguf"}},
         damage=lambda ws: exported_gguf(ws, None)),
    Case("garbage GGUF", "base", params={"base": {"source": "gguf:model.gguf"}},
         damage=lambda ws: garbage(ws / "model.gguf")),
    Case("hf: directory without config.json", "base", params={"base": {"source": "hf:my-model"}},
         damage=lambda ws: copy_as_hf_source(ws, lambda d: (d / "config.json").unlink())),
    Case("hf: directory without weights", "base", params={"base": {"source": "hf:my-model"}},
         damage=lambda ws: copy_as_hf_source(ws, lambda d: (d / "model.safetensors").unlink())),
    Case("hf: directory without tokenizer", "base", params={"base": {"source": "hf:my-model"}},
         damage=lambda ws: copy_as_hf_source(ws, no_tokenizer)),
    Case("hf: truncated model.safetensors", "base", params={"base": {"source": "hf:my-model"}},
         damage=lambda ws: copy_as_hf_source(ws, lambda d: truncate(d / "model.safetensors"))),
    Case("hf: config.json not JSON", "base", params={"base": {"source": "hf:my-model"}},
         damage=lambda ws: copy_as_hf_source(ws, lambda d: (d / "config.json").write_text("{llama"))),
    # corpus
    Case("corpus: Latin-1 text source", "corpus", damage=latin1_source),
    Case("corpus: non-UTF-8 JSONL source", "corpus",
         params={"corpus": {"user_sources": [{"domain": "rows", "path": "rows.jsonl", "format": "jsonl"}]}},
         damage=lambda ws: (ws / "rows.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')),
    Case("corpus: user source missing", "corpus",
         params={"corpus": {"user_sources": [{"domain": "books", "path": "nope/*.txt"}]}}),
    Case("corpus: garbage Parquet", "corpus",
         params={"corpus": {"user_sources": [{"domain": "t", "path": "t.parquet", "format": "parquet"}]}},
         damage=lambda ws: (ws / "t.parquet").write_bytes(b"PAR1 not parquet " * 8)),
    Case("corpus: unknown encoding utf-9", "corpus",
         params={"corpus": {"user_sources": [{"domain": "books", "path": "texts/*.txt", "encoding": "utf-9"}]}}),
    # missing upstream outputs
    Case("shards without data/models/base", "shards", damage=lambda ws: remove(ws / BASE)),
    Case("shards without data/raw", "shards", damage=lambda ws: remove(ws / "data/raw")),
    Case("prune without reports/scores/block_ppl.json", "prune", params=DEPTH,
         damage=lambda ws: remove(ws / "reports/scores/block_ppl.json")),
    Case("prune with block_ppl.json not JSON", "prune", params=DEPTH,
         damage=lambda ws: (ws / "reports/scores/block_ppl.json").write_text("{scores: ")),
    Case("retrain without data/models/pruned", "retrain", damage=lambda ws: remove(ws / "data/models/pruned")),
    Case("evaluate without data/models/retrained", "evaluate", args=("retrained",),
         damage=lambda ws: remove(ws / "data/models/retrained")),
    Case("evaluate of a model name that is not one", "evaluate", args=("final",)),
    # damaged checkpoints a stage wrote
    Case("base model.safetensors truncated (prune)", "prune", damage=lambda ws: truncate(ws / BASE / "model.safetensors")),
    Case("base model.safetensors garbage (score)", "score", damage=lambda ws: garbage(ws / BASE / "model.safetensors")),
    Case("base model.safetensors missing (prune)", "prune", damage=lambda ws: remove(ws / BASE / "model.safetensors")),
    Case("base tokenizer missing (prune)", "prune", damage=lambda ws: no_tokenizer(ws / BASE)),
    Case("base config.json not JSON (score)", "score", damage=lambda ws: (ws / BASE / "config.json").write_text("{")),
    Case("pruned config.json not JSON (retrain)", "retrain",
         damage=lambda ws: (ws / "data/models/pruned/config.json").write_text("")),
    Case("retrain checkpoint: tensor file truncated", "retrain", damage=lambda ws: truncate(retrain_shard(ws))),
    Case("retrain checkpoint: planted pickle in a tensor file", "retrain",
         damage=lambda ws: planted_pickle(retrain_shard(ws))),
    Case("retrain checkpoint: planted pickle as meta.json", "retrain",
         damage=lambda ws: planted_pickle(ws / "data/checkpoints/retrain/last/meta.json")),
]


def leftovers(ws: Path) -> None:
    """What a kill during atomic_dir's save leaves: a half-written temporary model folder."""
    tmp = ws / "data/models/.pruned.tmp-killed"
    shutil.copytree(ws / "data/models/pruned", tmp)
    truncate(tmp / "model.safetensors")


def killed_between_renames(ws: Path) -> None:
    """A kill between atomic_dir's two renames: the old output moved aside, the new one not in place."""
    shutil.copytree(ws / "data/models/pruned", ws / "data/models/.pruned.tmp-new")
    (ws / "data/models/pruned").rename(ws / "data/models/.pruned.old-killed")


def old_pickle_checkpoint(ws: Path) -> None:
    """The old checkpoint format (state.pt, a pickle) with a payload, as a teammate's cache could bring."""
    planted_pickle(ws / "data/checkpoints/retrain/state.pt")


# (fault, stage, damage, what must hold afterwards)
RECOVERED = [
    ("killed save: .pruned.tmp-* leftover", "prune", leftovers,
     lambda ws: not list((ws / "data/models").glob(".pruned.*"))),
    ("killed between the renames: data/models/pruned missing", "prune", killed_between_renames,
     lambda ws: (ws / "data/models/pruned/model.safetensors").is_file() and not list((ws / "data/models").glob(".pruned.*"))),
    ("old state.pt pickle with a payload in data/checkpoints/retrain", "retrain", old_pickle_checkpoint,
     lambda ws: not (ws / "data/checkpoints/retrain/pwned").exists()),
]


def one_line(text: str) -> str:
    """A cell of the markdown table."""
    return text.strip().replace("|", "\\|").replace("\n", " ⏎ ")[:400]


def check_case(golden: Path, work: Path, case: Case) -> dict:
    """Run one case on a fresh copy of the workspace; the row of the table."""
    ws = work / "ws"
    shutil.rmtree(ws, ignore_errors=True)
    shutil.copytree(golden, ws, symlinks=True)
    write_params(ws, case.params, case.text)
    if case.damage:
        case.damage(ws)
    before = snapshot(ws)
    done = run(ws, case.stage, case.args)
    after = snapshot(ws)
    err_lines = done.stderr.splitlines()
    pwned = [p for p in ws.rglob("pwned")]
    clear = (done.returncode == 1 and len(err_lines) == 1 and err_lines[0].startswith("error: ")
             and "Traceback" not in done.stdout + done.stderr and after == before and not pwned)
    return {"input": case.name, "stage": case.stage, "rc": done.returncode,
            "line": err_lines[0] if len(err_lines) == 1 else done.stderr[-600:],
            "untouched": after == before, "clear": clear, "pwned": bool(pwned)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "bench/results/bad_inputs.md"))
    parser.add_argument("--only", default="", help="run only the cases whose name contains this")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="shear-bad-inputs-") as tmp:
        golden, work = Path(tmp) / "golden", Path(tmp) / "work"
        build_workspace(golden)
        setup_s = time.time() - start
        rows = []
        for case in CASES:
            if args.only in case.name:
                rows.append(check_case(golden, work, case))
                print(f"{'clear' if rows[-1]['clear'] else 'NOT CLEAR'}: {case.name}: {one_line(rows[-1]['line'])}",
                      flush=True)
        recovered = []
        for name, stage, damage, holds in RECOVERED if not args.only else ():
            ws = work / "ws"
            shutil.rmtree(ws, ignore_errors=True)
            shutil.copytree(golden, ws, symlinks=True)
            damage(ws)
            done = run(ws, stage)
            ok = done.returncode == 0 and holds(ws) and "Traceback" not in done.stderr
            recovered.append({"fault": name, "stage": stage, "rc": done.returncode, "ok": ok,
                              "line": (done.stdout.strip().splitlines() or [""])[-1]})
            print(f"{'recovered' if ok else 'NOT RECOVERED'}: {name}", flush=True)
    total_s = time.time() - start
    clear = sum(r["clear"] for r in rows)
    lines = [
        "# Bad inputs and faults through the real stages (issue 14)",
        "",
        f"`OMP_NUM_THREADS=1 .venv/bin/python -m bench.bad_inputs` — {len(rows)} bad inputs, {clear} clear "
        "(exit 1, one line on stderr starting with `error: `, no traceback, every file of the workspace "
        "byte for byte as before, no planted payload run); "
        f"{sum(r['ok'] for r in recovered)}/{len(recovered)} faults recovered.",
        "",
        f"Machine: {platform.node()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
        f"(1 thread used), Python {platform.python_version()}, torch {torch.__version__}; "
        f"tiny pipeline `{TINY}` built by stages {', '.join(SETUP_STAGES)} in {setup_s:.0f} s; "
        f"whole run {total_s:.0f} s.",
        "",
        "| input | stage | exit code | the line printed | outputs untouched (y/n) | clear |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {one_line(r['input'])} | {r['stage']} | {r['rc']} | {one_line(r['line'])} | "
                     f"{'y' if r['untouched'] else 'n'} | {'yes' if r['clear'] else '**NO**'} |")
    if recovered:
        lines += ["", "Faults a stage recovers from by itself (exit 0; the leftovers gone and the output in place, or the old "
                  "pickle checkpoint ignored without being loaded: its payload never ran):", "",
                  "| fault | stage | exit code | last line printed | recovered |", "|---|---|---|---|---|"]
        for r in recovered:
            lines.append(f"| {one_line(r['fault'])} | {r['stage']} | {r['rc']} | {one_line(r['line'])} | "
                         f"{'yes' if r['ok'] else '**NO**'} |")
    if not args.only:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out}: {clear}/{len(rows)} clear, {total_s:.0f} s")


if __name__ == "__main__":
    main()
