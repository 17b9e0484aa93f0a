"""Figures: matplotlib set up once for files (no display), and the helpers several figures share.

Every module that draws gets pyplot from `pyplot()` and saves with `save_png`, so the Agg
backend is chosen in one place and every PNG is written atomically.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import IO

from shear.io import atomic_file


@functools.cache
def pyplot():
    """matplotlib.pyplot on the Agg backend (figures go to files; no display is needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str | Path | IO[bytes], dpi: int = 100) -> None:
    """Write `fig` as PNG to `path` (atomically) or to an open binary file, and close it."""
    try:
        if isinstance(path, (str, Path)):
            with atomic_file(path, "wb") as f:
                fig.savefig(f, format="png", dpi=dpi)
        else:
            fig.savefig(path, format="png", dpi=dpi)
    finally:
        pyplot().close(fig)


def log_y(ax) -> None:
    """A log-scale y axis labelled with plain numbers (3, 10, 30) instead of 3x10^0."""
    from matplotlib.ticker import FuncFormatter, LogFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.5)))


def grouped_bars(ax, groups: list[str], series: dict[str, list[float | None]]) -> None:
    """Bars of several series side by side within each group (None = no bar)."""
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar([x for x, v in zip(xs, values) if v is not None], [v for v in values if v is not None],
               width=width, label=name)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right")
