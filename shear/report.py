"""The report: one table and a few figures comparing the base, pruned and retrained models.

Inputs are the evaluate stage's metrics files (`reports/eval/<model>/metrics.json`, schema in
shear/evaluate.py), the speed stage's `reports/speed.json` (every model timed in one run:
every speed figure and speed-up here comes from it, never from two runs) and, optionally,
each model's `shear.json` (how it was made, its shape); shear/records.py types all three.
Outputs:

- `report.md`: one markdown table, a column per model, a row per quantity;
- `figures/*.png`: per-domain perplexity bars, speed bars, quality against size and speed;
- `figures/*.csv`: the same numbers as flat tables, which dvc.yaml declares as plots so that
  `dvc plots show` / `dvc plots diff` draw them (and compare them across experiments).
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

from shear.io import atomic_dir, atomic_file
from shear.plots import grouped_bars, log_y, pyplot, save_png
from shear.records import ModelRecord, SpeedRecord, batch_key, batch_rows


# ----------------------------------------------------------------------------- reading metrics


def dig(tree: dict, *keys: str):
    """tree[k1][k2]..., or None when a key is missing."""
    for key in keys:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def seq_lens(metrics: dict[str, dict]) -> list[str]:
    """Perplexity lengths evaluated for any model, shortest first (keys as in metrics.json)."""
    found = {length for m in metrics.values() for length in m.get("ppl", {})}
    return sorted(found, key=int)


def domains(metrics: dict[str, dict], length: str) -> list[str]:
    """Domains with a perplexity at `length` for any model, in first-seen order, without "mean"."""
    names = []
    for m in metrics.values():
        for d in m.get("ppl", {}).get(length, {}):
            if d != "mean" and d not in names:
                names.append(d)
    return names


def with_speed(metrics: dict[str, dict], speed: SpeedRecord | None) -> dict[str, dict]:
    """Each model's metrics with its `speed` and `speedup` sections taken from the one speed run.

    Any speed section a metrics file carries itself is dropped: figures of different runs
    never meet in one table or plot.
    """
    out = {}
    for name, m in metrics.items():
        m = {k: v for k, v in m.items() if k not in ("speed", "speedup")}
        if speed is not None and name in speed.models:
            m["speed"] = speed.models[name]
            if name in speed.speedup:
                m["speedup"] = speed.speedup[name]
        out[name] = m
    return out


def batch_speed(metrics: dict) -> dict[int, dict]:
    """Speed per batch size: {batch: {"decode_ms_per_token", "tokens_per_s", "prefill_ms", ...}}.

    shear.speed stores them under `speed.batch.bs<N>`.
    """
    return batch_rows(metrics.get("speed", {}))


def decode_speedup(metrics: dict, batch: int) -> float | None:
    """Decode speed-up over the base model at `batch` (`speedup.bs<N>.decode`), None if absent."""
    return dig(metrics, "speedup", batch_key(batch), "decode")


def mean_accuracy(metrics: dict) -> float | None:
    """Mean `acc` over the lm-eval tasks of a metrics file, None without tasks."""
    accs = [t["acc"] for t in metrics.get("tasks", {}).values() if "acc" in t]
    return sum(accs) / len(accs) if accs else None


def mean_ppl(metrics: dict, length: str) -> float | None:
    """`ppl.<length>.mean`, None if absent."""
    return dig(metrics, "ppl", length, "mean")


# ----------------------------------------------------------------------------- the table


def _fixed(digits: int):
    """Formatter: a number with `digits` decimals, "—" for a missing one."""
    return lambda v: "—" if v is None else f"{v:.{digits}f}"


def _times(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}×"


def _mib(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:.1f}"


def _params(n: int | None, base: int | None) -> str:
    if n is None:
        return "—"
    share = f" ({100 * n / base:.1f}%)" if base else ""
    return (f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}") + share


def _accuracy(task: dict | None) -> str:
    if not task or "acc" not in task:
        return "—"
    return f"{task['acc']:.3f} ± {task['acc_stderr']:.3f}" if "acc_stderr" in task else f"{task['acc']:.3f}"


def _made_by(record: ModelRecord | None) -> str:
    """How a model was made, from its shear.json: the method and, for pruning, the criterion."""
    if record is None:
        return "—"
    return f"{record.method} ({record.criterion})" if record.criterion else record.method


def _shape(record: ModelRecord | None) -> str:
    shape = record.shape if record is not None else None
    return shape.describe() if shape else "—"


def table_rows(metrics: dict[str, dict], records: dict[str, ModelRecord] | None = None) -> list[list[str]]:
    """Rows [quantity, cell per model] of the report table (models in the order of `metrics`).

    Lengths, domains, tasks and batch sizes are whatever the metrics files hold; a value a
    model lacks is "—". Speed-up and retention are relative to base, so base has none.
    """
    names = list(metrics)
    rows = []

    def each(*keys):
        return [dig(metrics[n], *keys) for n in names]

    def add(label, values, fmt):
        rows.append([label] + [fmt(v) for v in values])

    if records:
        add("made by", [records.get(n) for n in names], _made_by)
        add("shape", [records.get(n) for n in names], _shape)
    for kind in ("total", "non_embedding"):
        base = dig(metrics.get("base", {}), "params", kind)
        add(f"parameters, {kind.replace('_', '-')}", each("params", kind), lambda v, b=base: _params(v, b))
    for length in seq_lens(metrics):
        for d in domains(metrics, length) + ["mean"]:
            add(f"ppl@{length} {d}", each("ppl", length, d), _fixed(2))
    for task in dict.fromkeys(t for m in metrics.values() for t in m.get("tasks", {})):
        add(f"{task} acc", each("tasks", task), _accuracy)
    batches = sorted({b for m in metrics.values() for b in batch_speed(m)})
    for b in batches:
        add(f"decode ms/token, batch {b}", each("speed", "batch", batch_key(b), "decode_ms_per_token"), _fixed(2))
        add(f"decode tokens/s, batch {b}", each("speed", "batch", batch_key(b), "tokens_per_s"), _fixed(1))
        add(f"prefill ms, batch {b}", each("speed", "batch", batch_key(b), "prefill_ms"), _fixed(2))
        add(f"peak memory MiB, batch {b}", each("speed", "batch", batch_key(b), "peak_memory_bytes"), _mib)
    for b in batches:
        add(f"decode speed-up, batch {b}", each("speedup", batch_key(b), "decode"), _times)
    if any(v is not None for v in each("speedup", "ideal")):
        # what a purely memory-bound decoder would gain: base / this non-embedding parameters
        add("ideal decode speed-up", each("speedup", "ideal"), _times)
    for length in seq_lens(metrics):
        add(f"retention, ppl@{length} (base/this)", each("retention", f"ppl_{length}"), _fixed(3))
    if any(v is not None for v in each("retention", "acc_mean")):
        add("retention, mean acc (this/base)", each("retention", "acc_mean"), _fixed(3))
    return rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table; the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- data files for DVC plots


def perplexity_rows(m: dict) -> list[dict]:
    """One model's per-domain perplexity as flat rows (label = "<domain> @<len>")."""
    return [{"label": f"{d} @{length}", "domain": d, "seq_len": int(length), "ppl": value}
            for length, values in sorted(m.get("ppl", {}).items(), key=lambda kv: int(kv[0]))
            for d, value in values.items()]


def speed_rows(metrics: dict[str, dict]) -> list[dict]:
    """Decode and prefill speed of every model at every batch size as flat rows."""
    return [{"label": f"{name} · batch {b}", "model": name, "batch": b,
             "decode_ms_per_token": r.get("decode_ms_per_token"), "tokens_per_s": r.get("tokens_per_s"),
             "prefill_ms": r.get("prefill_ms")}
            for name, m in metrics.items() for b, r in batch_speed(m).items()]


def quality_rows(metrics: dict[str, dict]) -> list[dict]:
    """One row per model: size, speed (smallest batch) and quality (mean ppl at the shortest length)."""
    lengths = seq_lens(metrics)
    length = lengths[0] if lengths else None
    rows = []
    for name, m in metrics.items():
        speed = batch_speed(m)
        first = speed[min(speed)] if speed else {}
        rows.append({
            "model": name,
            "params_total": m.get("params", {}).get("total"),
            "non_embedding_params": m.get("params", {}).get("non_embedding"),
            "ppl": mean_ppl(m, length) if length else None,
            "ppl_seq_len": int(length) if length else None,
            "acc_mean": mean_accuracy(m),
            "tokens_per_s": first.get("tokens_per_s"),
            "batch": min(speed) if speed else None,
        })
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    """Rows of dicts -> CSV (columns of the first row; None -> empty)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["empty"])
        writer.writeheader()
        writer.writerows(rows)


# ----------------------------------------------------------------------------- figures


def plot_perplexity(metrics: dict[str, dict], path: Path) -> None:
    """Per-domain perplexity, one panel per evaluated length, one bar per model in each domain."""
    plt = pyplot()
    lengths = seq_lens(metrics)
    fig, axes = plt.subplots(1, max(len(lengths), 1), figsize=(6 * max(len(lengths), 1), 4), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        groups = domains(metrics, length) + ["mean"]
        series = {n: [m.get("ppl", {}).get(length, {}).get(d) for d in groups] for n, m in metrics.items()}
        grouped_bars(ax, groups, series)
        log_y(ax)  # a pruned model's perplexity can be many times the base model's
        ax.set_ylabel("perplexity (log scale)")
        ax.set_title(f"perplexity at {length} tokens (lower is better)")
        ax.legend()
    fig.tight_layout()
    save_png(fig, path)


def plot_speed(metrics: dict[str, dict], path: Path) -> None:
    """Decode tokens/s and prefill latency per batch size, one bar per model."""
    plt = pyplot()
    batches = sorted({b for m in metrics.values() for b in batch_speed(m)})
    groups = [f"batch {b}" for b in batches]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "tokens_per_s", "decode tokens/s (higher is better)"),
                           (axes[1], "prefill_ms", "prefill ms (lower is better)")):
        series = {n: [batch_speed(m).get(b, {}).get(key) for b in batches] for n, m in metrics.items()}
        grouped_bars(ax, groups, series)
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    save_png(fig, path)


def plot_quality(metrics: dict[str, dict], path: Path) -> None:
    """Mean perplexity (shortest length) against non-embedding parameters and against decode speed."""
    plt = pyplot()
    rows = quality_rows(metrics)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "non_embedding_params", "non-embedding parameters (M)"),
                           (axes[1], "tokens_per_s", "decode tokens/s")):
        for r in rows:
            if r[key] is None or r["ppl"] is None:
                continue
            x = r[key] / 1e6 if key == "non_embedding_params" else r[key]
            ax.scatter([x], [r["ppl"]], s=50)
            ax.annotate(r["model"], (x, r["ppl"]), textcoords="offset points", xytext=(5, 5))
        ax.set_xlabel(label + (f" (batch {rows[0]['batch']})" if key == "tokens_per_s" and rows else ""))
        ax.set_ylabel(f"mean perplexity @{rows[0]['ppl_seq_len'] if rows else '?'}")
        log_y(ax)
        ax.margins(0.15)  # room for the labels
        ax.grid(alpha=0.3)
    axes[0].set_title("quality vs size")
    axes[1].set_title("quality vs speed")
    fig.tight_layout()
    save_png(fig, path)


# ----------------------------------------------------------------------------- the report


def protocol_lines(metrics: dict[str, dict], speed: SpeedRecord | None = None) -> list[str]:
    """A few lines on how the numbers were measured, from the metrics and speed files themselves."""
    lines = []
    for name, m in metrics.items():
        info, proto = m.get("info", {}), m.get("ppl_protocol", {})
        parts = [f"device {info.get('device', '?')}"]
        if "dtype" in info:
            parts.append(f"weights {info['dtype']}")
        if proto:
            used = ", ".join(f"{k}→{v}" for k, v in proto.get("seq_len", {}).items() if str(k) != str(v))
            parts.append(f"BOS {'prepended' if proto.get('bos') else 'not prepended'}"
                         + (f", lengths clamped {used}" if used else ""))
        if "wall_s" in info:
            parts.append(f"evaluated in {info['wall_s']} s")
        lines.append(f"- **{name}**: " + "; ".join(parts))
    if speed is not None and speed.models:
        first = next(iter(speed.models.values()))
        described = [f"{first['path']} path" if "path" in first else None, first.get("dtype"),
                     f"prompt {first['prompt_len']} + {first['new_tokens']} new tokens"
                     if "prompt_len" in first and "new_tokens" in first else None,
                     f"median of {first['repeats']} runs" if "repeats" in first else None]
        machine = speed.info
        where = ", ".join(str(x) for x in (machine.get("device"), machine.get("gpu") or machine.get("cpu"),
                                             f"load {machine['load_average']:.2f}" if "load_average" in machine
                                             else None) if x)
        lines.append(f"- **speed**: {', '.join(sorted(speed.models))} timed in one run ({where}), their runs "
                     f"interleaved; " + ", ".join(d for d in described if d))
    return lines


def export_lines(export: dict | None) -> list[str]:
    """The deployment section: each exported GGUF file's size, its re-read error and, when
    llama.cpp was installed, llama.cpp's perplexity and batch-1 speed (reports/export/metrics.json)."""
    if not export:
        return []
    def num(v, fmt):
        return "—" if v is None else format(v, fmt)
    rows = []
    for model, entry in export.items():
        if model == "info":
            continue
        for fmt, row in entry.items():
            if not isinstance(row, dict):
                continue
            rows.append([f"{model} {fmt}", f"{row['file_bytes'] / 2**20:.1f}", num(row.get("reread_logits_rel_error"), ".1e"),
                         f"{num(row.get('ppl_llama_cpp'), '.2f')} / {num(row.get('ppl_pipeline'), '.2f')}",
                         num(row.get("decode_tokens_per_s"), ".1f"), num(row.get("prompt_tokens_per_s"), ".1f"),
                         "—" if "decode_speedup" not in row else
                         f"{row['decode_speedup']:.2f}× ({row['decode_speedup_of_ideal']:.2f} of ideal)"])
    info = export.get("info", {})
    return ["## Deployment: GGUF in llama.cpp", "",
            f"llama.cpp {info.get('llama_cpp', '?')}, {info.get('threads', '?')} thread(s), batch 1; perplexity "
            f"at {info.get('ppl_seq_len', '?')} tokens on the eval split, llama.cpp / this pipeline; speed-up over "
            "the base model's file of the same format (data/export/, reports/export/metrics.json).", "",
            markdown_table(["file", "MiB", "re-read rel. error", "ppl llama.cpp / ours", "decode tok/s",
                            "prompt tok/s", "decode speed-up"], rows)]


def render_markdown(metrics: dict[str, dict], records: dict[str, ModelRecord] | None = None,
                    figures_rel: str = "figures", speed: SpeedRecord | None = None,
                    export: dict | None = None) -> str:
    """The text of report.md (`metrics` already merged `with_speed`; `export`: the export stage's metrics)."""
    names = list(metrics)
    parts = [
        "# shear report: " + " vs ".join(names),
        "",
        "Perplexity is per domain on the held-out eval split (lower is better); task accuracy is "
        "lm-eval `acc` ± its standard error; speed is greedy decoding with a static KV cache "
        "(median over repeats), every model timed in one run; speed-up and retention are relative "
        "to the base model.",
        "",
        markdown_table(["", *names], table_rows(metrics, records)),
        *export_lines(export),
        "## How it was measured",
        "",
        *protocol_lines(metrics, speed),
        "",
        "## Figures",
        "",
        f"![per-domain perplexity]({figures_rel}/perplexity.png)",
        "",
        f"![speed]({figures_rel}/speed.png)",
        "",
        f"![quality against size and speed]({figures_rel}/quality.png)",
        "",
    ]
    return "\n".join(parts)


def write_report(metrics: dict[str, dict], md_path: str | Path, figures_dir: str | Path,
                 records: dict[str, ModelRecord] | None = None, speed: SpeedRecord | None = None,
                 export: dict | None = None) -> str:
    """Write report.md, the PNG figures and their CSV data (atomically); returns the markdown.

    Every speed figure, in the table and in the plots, comes from `speed` (one run).
    """
    md_path, figures_dir = Path(md_path), Path(figures_dir)
    metrics = with_speed(metrics, speed)
    with atomic_dir(figures_dir) as tmp:
        plot_perplexity(metrics, tmp / "perplexity.png")
        plot_speed(metrics, tmp / "speed.png")
        plot_quality(metrics, tmp / "quality.png")
        for name, m in metrics.items():
            write_csv(tmp / "perplexity" / f"{name}.csv", perplexity_rows(m))
        write_csv(tmp / "speed.csv", speed_rows(metrics))
        write_csv(tmp / "quality.csv", quality_rows(metrics))
    # image links relative to report.md, so the report renders wherever the repository is
    rel = os.path.relpath(figures_dir.resolve(), md_path.parent.resolve())
    text = render_markdown(metrics, records, figures_rel=Path(rel).as_posix(), speed=speed, export=export)
    with atomic_file(md_path) as f:
        f.write(text)
    return text
