"""The report: one table and a few figures comparing the base, pruned and retrained models.

Inputs are the evaluate stage's metrics files (`reports/eval/<model>/metrics.json`, schema in
shear/evaluate.py and shear/speed.py) and, optionally, each model's `shear.json` (how it was
made, its shape). Outputs:

- `report.md`: one markdown table, a column per model, a row per quantity;
- `figures/*.png`: per-domain perplexity bars, speed bars, quality against size and speed;
- `figures/*.csv`: the same numbers as flat tables, which dvc.yaml declares as plots so that
  `dvc plots show` / `dvc plots diff` draw them (and compare them across experiments).
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from shear.io import atomic_dir, atomic_file


# ----------------------------------------------------------------------------- reading metrics


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b.c": leaf}, the way DVC shows metrics and params."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flatten(value, path + ".")
        else:
            flat[path] = value
    return flat


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


def batch_speed(metrics: dict) -> dict[int, dict]:
    """Speed per batch size: {batch: {"decode_ms_per_token", "tokens_per_s", "prefill_ms", ...}}.

    shear.speed stores them under `speed.batch.bs<N>`.
    """
    rows = metrics.get("speed", {}).get("batch", {})
    return dict(sorted((int(key.removeprefix("bs")), row) for key, row in rows.items()))


def decode_speedup(metrics: dict, batch: int) -> float | None:
    """Decode speed-up over the base model at `batch` (`speedup.bs<N>.decode`), None if absent."""
    return dig(metrics, "speedup", f"bs{batch}", "decode")


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


def _made_by(record: dict | None) -> str:
    """How a model was made, from its shear.json: the method and, for depth pruning, the criterion."""
    if not record:
        return "—"
    method = record.get("method", "?")
    return f"{method} ({record['criterion']})" if record.get("criterion") else str(method)


def _shape(record: dict | None) -> str:
    a = (record or {}).get("architecture")
    if not a:
        return "—"
    return (f"{a['num_hidden_layers']} L · d {a['hidden_size']} · {a['num_attention_heads']}/"
            f"{a['num_key_value_heads']} heads · MLP {a['intermediate_size']}")


def table_rows(metrics: dict[str, dict], records: dict[str, dict] | None = None) -> list[list[str]]:
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
        add(f"decode ms/token, batch {b}", each("speed", "batch", f"bs{b}", "decode_ms_per_token"), _fixed(2))
        add(f"decode tokens/s, batch {b}", each("speed", "batch", f"bs{b}", "tokens_per_s"), _fixed(1))
        add(f"prefill ms, batch {b}", each("speed", "batch", f"bs{b}", "prefill_ms"), _fixed(2))
        add(f"peak memory MiB, batch {b}", each("speed", "batch", f"bs{b}", "peak_memory_bytes"), _mib)
    for b in batches:
        add(f"decode speed-up, batch {b}", each("speedup", f"bs{b}", "decode"), _times)
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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display; figures go to files
    import matplotlib.pyplot as plt

    return plt


def _log_y(ax) -> None:
    """A log-scale y axis labelled with plain numbers (3, 10, 30) instead of 3x10^0."""
    from matplotlib.ticker import FuncFormatter, LogFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.5)))


def _grouped_bars(ax, groups: list[str], series: dict[str, list[float | None]]) -> None:
    """Bars of several series side by side within each group (None = no bar)."""
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar([x for x, v in zip(xs, values) if v is not None], [v for v in values if v is not None],
               width=width, label=name)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right")


def plot_perplexity(metrics: dict[str, dict], path: Path) -> None:
    """Per-domain perplexity, one panel per evaluated length, one bar per model in each domain."""
    plt = _pyplot()
    lengths = seq_lens(metrics)
    fig, axes = plt.subplots(1, max(len(lengths), 1), figsize=(6 * max(len(lengths), 1), 4), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        groups = domains(metrics, length) + ["mean"]
        series = {n: [m.get("ppl", {}).get(length, {}).get(d) for d in groups] for n, m in metrics.items()}
        _grouped_bars(ax, groups, series)
        _log_y(ax)  # a pruned model's perplexity can be many times the base model's
        ax.set_ylabel("perplexity (log scale)")
        ax.set_title(f"perplexity at {length} tokens (lower is better)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_speed(metrics: dict[str, dict], path: Path) -> None:
    """Decode tokens/s and prefill latency per batch size, one bar per model."""
    plt = _pyplot()
    batches = sorted({b for m in metrics.values() for b in batch_speed(m)})
    groups = [f"batch {b}" for b in batches]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "tokens_per_s", "decode tokens/s (higher is better)"),
                           (axes[1], "prefill_ms", "prefill ms (lower is better)")):
        series = {n: [batch_speed(m).get(b, {}).get(key) for b in batches] for n, m in metrics.items()}
        _grouped_bars(ax, groups, series)
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_quality(metrics: dict[str, dict], path: Path) -> None:
    """Mean perplexity (shortest length) against non-embedding parameters and against decode speed."""
    plt = _pyplot()
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
        _log_y(ax)
        ax.margins(0.15)  # room for the labels
        ax.grid(alpha=0.3)
    axes[0].set_title("quality vs size")
    axes[1].set_title("quality vs speed")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- the report


def protocol_lines(metrics: dict[str, dict]) -> list[str]:
    """A few lines on how the numbers were measured, from the metrics files themselves."""
    lines = []
    for name, m in metrics.items():
        info, proto, speed = m.get("info", {}), m.get("ppl_protocol", {}), m.get("speed", {})
        parts = [f"device {info.get('device', '?')}"]
        if proto:
            used = ", ".join(f"{k}→{v}" for k, v in proto.get("seq_len", {}).items() if str(k) != str(v))
            parts.append(f"BOS {'prepended' if proto.get('bos') else 'not prepended'}"
                         + (f", lengths clamped {used}" if used else ""))
        described = [f"{speed['path']} path" if "path" in speed else None, speed.get("dtype"),
                     f"prompt {speed['prompt_len']} + {speed['new_tokens']} new tokens"
                     if "prompt_len" in speed and "new_tokens" in speed else None,
                     f"median of {speed['repeats']}" if "repeats" in speed else None]
        described = [d for d in described if d]
        if described:
            parts.append("speed: " + ", ".join(described))
        if "wall_s" in info:
            parts.append(f"evaluated in {info['wall_s']} s")
        lines.append(f"- **{name}**: " + "; ".join(parts))
    return lines


def render_markdown(metrics: dict[str, dict], records: dict[str, dict] | None = None,
                    figures_rel: str = "figures") -> str:
    """The text of report.md."""
    names = list(metrics)
    parts = [
        "# shear report: " + " vs ".join(names),
        "",
        "Perplexity is per domain on the held-out eval split (lower is better); task accuracy is "
        "lm-eval `acc` ± its standard error; speed is greedy decoding with a static KV cache "
        "(median over repeats); speed-up and retention are relative to the base model measured "
        "in the same run.",
        "",
        markdown_table(["", *names], table_rows(metrics, records)),
        "## How it was measured",
        "",
        *protocol_lines(metrics),
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
                 records: dict[str, dict] | None = None) -> str:
    """Write report.md, the PNG figures and their CSV data (atomically); returns the markdown."""
    md_path, figures_dir = Path(md_path), Path(figures_dir)
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
    text = render_markdown(metrics, records, figures_rel=Path(rel).as_posix())
    with atomic_file(md_path) as f:
        f.write(text)
    return text

