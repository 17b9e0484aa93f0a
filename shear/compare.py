"""Compare every DVC experiment: one table and Pareto plots of quality against size and speed.

    python -m shear.compare            # or: make compare

Reads `dvc exp show --json` (the workspace, the current commit and all its experiments,
queued and failed ones skipped), takes each one's `reports/eval/<model>/metrics.json` and
its speed from `reports/speed.json` (runs made before the speed stage existed carry it in
the metrics file), and writes, into --out (default reports/):

- compare.md / compare.csv: one row per experiment with the params that differ between
  experiments and the key metrics (non-embedding parameters, mean perplexity, mean task
  accuracy, decode tokens/s, decode speed-up over the base model measured in the same run);
- compare_pareto.png: quality against non-embedding parameters and against decode
  tokens/s; the Pareto frontier (no other run is both smaller/faster and better) in red.

The base (unpruned) model is one more row, so the plots show what pruning traded away.
Decode tokens/s of different runs compare only when they ran on the same machine; the
speed-up column is measured against the base model within each run.
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

from shear.errors import ShearError
from shear.io import atomic_file, read_json
from shear.plots import pyplot, save_png
from shear.records import REFERENCE_MODEL, SpeedRecord, flatten
from shear.report import batch_speed, decode_speedup, markdown_table, mean_accuracy, mean_ppl, with_speed

EVAL = "reports/eval/{}/metrics.json"
SPEED = "reports/speed.json"


# ----------------------------------------------------------------------------- collecting


def find_dvc_root(start: Path) -> Path:
    """The nearest directory at or above `start` holding `.dvc/`, or a one-line ShearError."""
    for path in [start, *start.parents]:
        if (path / ".dvc").is_dir():
            return path
    raise ShearError(f"{start}: not inside a DVC repository (no .dvc/ here or above); "
                     "run `make compare` (or python -m shear.compare) in the shear checkout")


def exp_show(root: Path, all_commits: bool = False) -> list:
    """The parsed output of `dvc exp show --json` run in `root`."""
    cmd = [sys.executable, "-m", "dvc", "exp", "show", "--json"] + (["--all-commits"] if all_commits else [])
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ShearError(f"`dvc exp show --json` failed in {root}: {last}")
    return json.loads(done.stdout or "[]")


def _metrics(data: dict) -> dict[str, dict]:
    """{metrics file: its content} of one revision, without files DVC could not read."""
    return {path: entry["data"] for path, entry in (data.get("metrics") or {}).items() if "data" in entry}


def _params(data: dict) -> dict:
    """The flattened params of one revision ("prune.ratio": 0.2); other files than params.yaml prefixed."""
    flat = {}
    for path, entry in (data.get("params") or {}).items():
        prefix = "" if path == "params.yaml" else f"{path}:"
        flat |= flatten(entry.get("data") or {}, prefix)
    return flat


def experiments(exp_json: list) -> list[dict]:
    """Runs in `dvc exp show --json`: [{"name", "rev", "params", "metrics"}], workspace first.

    The workspace is left out when it holds exactly the results of a commit or experiment
    (after `dvc exp run` it holds the last experiment's); queued, running and failed
    experiments are left out too (a running one shows its baseline's metrics until it ends).
    """
    runs, commit_results = [], []
    for entry in exp_json:
        data = entry.get("data") or {}
        workspace = entry["rev"] == "workspace"
        params, metrics = _params(data), _metrics(data)
        # With --all-commits, older commits with the same params and results as a newer one are
        # listed once (as the newest); their experiments are still listed.
        if workspace or (params, metrics) not in commit_results:
            runs.append({"name": "workspace" if workspace else entry.get("name") or entry["rev"][:7],
                         "rev": "" if workspace else entry["rev"][:7], "params": params, "metrics": metrics})
        if not workspace:
            commit_results.append((params, metrics))
        for exp in entry.get("experiments") or []:
            if (exp.get("executor") or {}).get("state") in ("queued", "running", "failed"):
                continue
            for rev in exp.get("revs") or []:
                if rev.get("error"):
                    continue
                d = rev.get("data") or {}
                runs.append({"name": rev.get("name") or exp.get("name") or rev["rev"][:7], "rev": rev["rev"][:7],
                             "params": _params(d), "metrics": _metrics(d)})
    if runs and runs[0]["name"] == "workspace":
        ws = runs[0]
        if any(r["params"] == ws["params"] and r["metrics"] == ws["metrics"] for r in runs[1:]):
            runs = runs[1:]
    return [r for r in runs if r["metrics"]]


# ----------------------------------------------------------------------------- the table


def summary(metrics: dict, seq_len: str) -> dict:
    """Key numbers of one metrics.json: size, quality, speed (at its smallest batch size)."""
    speed = batch_speed(metrics)
    batch = min(speed) if speed else None
    return {
        "non_embedding_params": metrics.get("params", {}).get("non_embedding"),
        "ppl": mean_ppl(metrics, seq_len),
        "acc": mean_accuracy(metrics),
        "tokens_per_s": speed[batch].get("tokens_per_s") if speed else None,
        "speedup": decode_speedup(metrics, batch) if speed else None,
        "batch": batch,
    }


def differing_params(runs: list[dict]) -> list[str]:
    """Params keys whose values are not the same in every run, in params-file order."""
    keys = list(dict.fromkeys(k for r in runs for k in r["params"]))
    return [k for k in keys if len({json.dumps(r["params"].get(k), sort_keys=True) for r in runs}) > 1]


def default_seq_len(runs: list[dict], model: str) -> str:
    """128 (the seeds' protocol) when some run evaluated it, else the shortest evaluated length."""
    found = {length for r in runs for length in r["metrics"].get(EVAL.format(model), {}).get("ppl", {})}
    return "128" if "128" in found or not found else min(found, key=int)


def model_metrics(run: dict, model: str) -> dict | None:
    """`model`'s metrics in one run, with its speed from the run's speed file when it has one."""
    metrics = run["metrics"].get(EVAL.format(model))
    speed = run["metrics"].get(SPEED)
    if metrics is None or speed is None:
        return metrics  # before the speed stage, a metrics file carried its own same-run speed
    return with_speed({model: metrics}, SpeedRecord.from_dict(speed, f"{run['name']}: {SPEED}"))[model]


def comparison(runs: list[dict], model: str = "retrained", seq_len: str = "128") -> tuple[list[str], list[dict]]:
    """(differing param keys, rows): one row per run with `model`'s metrics, plus a row per distinct base model.

    Base models are told apart by their quality metrics; the speed of a base row is that of
    the first run that timed it (tokens/s of different runs compare only on the same machine).
    """
    path = EVAL.format(model)
    used = [r for r in runs if path in r["metrics"]]
    keys = differing_params(used)
    rows, bases = [], {}
    for r in used:
        rows.append({"name": r["name"], "rev": r["rev"], **{k: r["params"].get(k) for k in keys},
                     **summary(model_metrics(r, model), seq_len)})
        base = r["metrics"].get(EVAL.format(REFERENCE_MODEL))
        if base is not None:
            bases.setdefault(json.dumps(with_speed({"b": base}, None)["b"], sort_keys=True),
                             model_metrics(r, REFERENCE_MODEL))
    for i, base in enumerate(bases.values()):
        row = {"name": "base model" + (f" {i + 1}" if len(bases) > 1 else ""), "rev": "", **{k: None for k in keys},
               **summary(base, seq_len)}
        row["speedup"] = 1.0  # by definition
        rows.append(row)
    return keys, rows


def pareto_front(points: list[tuple[float | None, float | None]], maximize: tuple[bool, bool]) -> list[bool]:
    """For each (x, y), whether no other point is at least as good on both axes and better on one.

    `maximize[i]` says whether larger is better on axis i. Points with a missing
    coordinate are never on the front.
    """
    sign = [-1 if m else 1 for m in maximize]  # turn both axes into "smaller is better"
    cost = [None if x is None or y is None else (sign[0] * x, sign[1] * y) for x, y in points]
    front = []
    for i, a in enumerate(cost):
        dominated = a is None or any(
            b is not None and j != i and b[0] <= a[0] and b[1] <= a[1] and b != a for j, b in enumerate(cost))
        front.append(not dominated)
    return front


def quality_key(quality: str, seq_len: str) -> tuple[str, str, bool]:
    """(row key, axis label, larger is better) of the quality measure."""
    if quality == "acc":
        return "acc", "mean task accuracy", True
    return "ppl", f"mean perplexity @{seq_len}", False


def mark_fronts(rows: list[dict], quality: str) -> None:
    """Add "front_size" and "front_speed" flags to each row (Pareto-optimal or not)."""
    key, _, larger_better = quality_key(quality, "")
    size = pareto_front([(r["non_embedding_params"], r[key]) for r in rows], (False, larger_better))
    speed = pareto_front([(r["tokens_per_s"], r[key]) for r in rows], (True, larger_better))
    for r, a, b in zip(rows, size, speed):
        r["front_size"], r["front_speed"] = a, b


def _cell(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "✓" if value else ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


COLUMNS = [("non_embedding_params", "non-emb. params"), ("ppl", "mean ppl@{seq_len}"), ("acc", "mean acc"),
           ("tokens_per_s", "decode tok/s"), ("speedup", "decode speed-up"), ("front_size", "Pareto (size)"),
           ("front_speed", "Pareto (speed)")]


def render(keys: list[str], rows: list[dict], model: str, seq_len: str, quality: str) -> str:
    """The markdown of compare.md."""
    header = ["experiment", "rev", *keys] + [title.format(seq_len=seq_len) for _, title in COLUMNS]
    body = [[r["name"], r["rev"], *(_cell(r[k]) for k in keys), *(_cell(r[c]) for c, _ in COLUMNS)] for r in rows]
    batch = next((r["batch"] for r in rows if r["batch"] is not None), None)
    return "\n".join([
        f"# Experiments: the {model} model of each run",
        "",
        f"Quality = {quality_key(quality, seq_len)[1]}; decode speed at batch {batch}; speed-up is over the "
        "base model measured in the same run. Pareto: no other row is both smaller (or faster) and better.",
        "",
        markdown_table(header, body),
        "![Pareto plots](compare_pareto.png)",
        "",
    ])


# ----------------------------------------------------------------------------- the plot


def plot_pareto(rows: list[dict], quality: str, seq_len: str, path) -> None:
    """Quality against non-embedding parameters and against decode tokens/s, the front in red, as PNG to `path`."""
    plt = pyplot()
    key, label, larger_better = quality_key(quality, seq_len)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, x_key, front_key, x_label in (
            (axes[0], "non_embedding_params", "front_size", "non-embedding parameters (M)"),
            (axes[1], "tokens_per_s", "front_speed", "decode tokens/s")):
        pts = [(r[x_key] / (1e6 if x_key == "non_embedding_params" else 1), r[key], r) for r in rows
               if r[x_key] is not None and r[key] is not None]
        for x, y, r in pts:
            base = r["name"].startswith("base model")
            ax.scatter([x], [y], marker="*" if base else "o", s=120 if base else 40,
                       color="tab:red" if r[front_key] else "tab:gray", zorder=3)
            ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        front = sorted((x, y) for x, y, r in pts if r[front_key])
        if len(front) > 1:
            ax.plot(*zip(*front), color="tab:red", lw=1, zorder=2, label="Pareto frontier")
            ax.legend()
        ax.set_xlabel(x_label)
        ax.set_ylabel(label + (" (higher is better)" if larger_better else " (lower is better)"))
        ax.margins(0.15)
        ax.grid(alpha=0.3)
    axes[0].set_title("quality vs size")
    axes[1].set_title("quality vs decode speed")
    fig.tight_layout()
    save_png(fig, path)


# ----------------------------------------------------------------------------- command line


def write_outputs(keys: list[str], rows: list[dict], out: Path, model: str, seq_len: str, quality: str) -> str:
    """Write compare.md, compare.csv and compare_pareto.png into `out`; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    text = render(keys, rows, model, seq_len, quality)
    with atomic_file(out / "compare.md") as f:
        f.write(text)
    with atomic_file(out / "compare.csv") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot_pareto(rows, quality, seq_len, out / "compare_pareto.png")
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="retrained", choices=["pruned", "retrained"],
                        help="which model of each run to compare (default: retrained)")
    parser.add_argument("--quality", default="ppl", choices=["ppl", "acc"],
                        help="quality axis: mean perplexity or mean task accuracy (default: ppl)")
    parser.add_argument("--seq-len", help="perplexity length, one of evaluate.ppl_seq_lens (default: 128 when "
                                          "evaluated, else the shortest)")
    parser.add_argument("--all-commits", action="store_true", help="experiments of every commit, not just HEAD")
    parser.add_argument("--json", type=Path, help="read a saved `dvc exp show --json` output instead of running it")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="output directory (default: reports)")
    args = parser.parse_args(argv)
    try:
        if args.json:
            exp_json = read_json(args.json)
        else:
            exp_json = exp_show(find_dvc_root(Path.cwd()), args.all_commits)
        runs = experiments(exp_json)
        seq_len = args.seq_len or default_seq_len(runs, args.model)
        keys, rows = comparison(runs, args.model, seq_len)
        if not rows:
            raise ShearError(f"no run has {EVAL.format(args.model)} yet: run `dvc repro` or `dvc exp run` first")
        mark_fronts(rows, args.quality)
        text = write_outputs(keys, rows, args.out, args.model, seq_len, args.quality)
    except ShearError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(text[text.index("| "):text.index("![")], end="")
    print(f"compare: {len(rows)} rows -> {args.out}/compare.md, compare.csv, compare_pareto.png")


if __name__ == "__main__":
    main()
