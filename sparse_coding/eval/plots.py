"""PNG plots of sweep results (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def heatmap(
    values: Sequence[Sequence[float | None]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str,
    path: str | Path,
    row_name: str,
    col_name: str = "dict_ratio",
    fmt: str = "{:.2f}",
) -> Path:
    """Writes a grid (rows × columns) as an annotated heatmap; None cells are left blank."""
    grid = np.array([[np.nan if v is None else float(v) for v in row] for row in values], dtype=float)
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(col_labels), 1.0 + 0.45 * len(row_labels)))
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="auto", origin="lower")
    ax.set_xticks(range(len(col_labels)), labels=list(col_labels))
    ax.set_yticks(range(len(row_labels)), labels=list(row_labels))
    ax.set_xlabel(col_name)
    ax.set_ylabel(row_name)
    ax.set_title(title)
    finite = grid[np.isfinite(grid)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for (i, j), v in np.ndenumerate(grid):
        if np.isfinite(v):
            ax.text(
                j,
                i,
                fmt.format(v),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if v < middle else "black",
            )
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def density_histograms(densities: dict[str, Any], title: str, path: str | Path) -> Path:
    """Writes log10 feature-density histograms (one line per SAE); dead features are counted at the left edge."""
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(-8, 0, 41)
    for label, dens in densities.items():
        d = np.asarray(dens, dtype=float)
        ax.hist(np.log10(np.clip(d, 1e-8, None)), bins=bins, histtype="step", label=label)
    ax.set_xlabel("log10 feature density (fraction of tokens it fires on; dead at -8)")
    ax.set_ylabel("features")
    ax.set_title(title)
    if len(densities) <= 12:
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def metrics_against_l0(
    runs: Sequence[dict[str, Any]], keys: Sequence[tuple[str, str]], group: str, title: str, path: str | Path
) -> Path:
    """Writes one panel per (key, label) of `keys`, each metric against L0 (log scale), one line per value of
    `group` (e.g. the architecture), its points in order of L0: which group gets the most for its sparsity."""
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.8))
    for ax, (key, label) in zip(np.atleast_1d(axes), keys, strict=True):
        for name in dict.fromkeys(r[group] for r in runs):
            points = sorted((r["l0"], r[key]) for r in runs if r[group] == name and r[key] is not None and r["l0"])
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=str(name))
        ax.set_xscale("log")
        ax.set_xlabel("L0 (active latents per example)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def grouped_bars(
    values: dict[str, dict[str, float | None]], title: str, xlabel: str, ylabel: str, path: str | Path
) -> Path:
    """Bars of values[series][category], one colour per series, grouped by category; None bars are left out."""
    categories = sorted({c for per in values.values() for c in per}, key=lambda c: (len(c), c))
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * max(len(categories), 1), 3.8))
    width = 0.8 / max(len(values), 1)
    for s, (series, per) in enumerate(values.items()):
        xs = [i + s * width for i, c in enumerate(categories) if per.get(c) is not None]
        ax.bar(xs, [per[c] for c in categories if per.get(c) is not None], width, label=series)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(categories))], labels=categories)
    return _finish(fig, ax, title, xlabel, ylabel, path)


def lines(
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    title: str,
    xlabel: str,
    ylabel: str,
    path: str | Path,
    log_x: bool = False,
    reference: dict[str, float] | None = None,
) -> Path:
    """One marked line per series (x values, y values), plus dashed horizontal reference lines."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, (xs, ys) in series.items():
        order = np.argsort(np.asarray(xs, dtype=float))
        ax.plot(np.asarray(xs, dtype=float)[order], np.asarray(ys, dtype=float)[order], marker="o", label=label)
    for label, y in (reference or {}).items():
        ax.axhline(y, linestyle="--", color="grey", linewidth=1)
        ax.annotate(label, (0.01, y), xycoords=("axes fraction", "data"), fontsize=7, va="bottom")
    if log_x:
        ax.set_xscale("log")
    return _finish(fig, ax, title, xlabel, ylabel, path)


def _finish(fig: Any, ax: Any, title: str, xlabel: str, ylabel: str, path: str | Path) -> Path:
    """Labels, legend, layout; writes the figure to path and frees it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def histogram(
    values: Any,
    bins: int,
    value_range: tuple[float, float],
    bands: Sequence[tuple[float, float, str]],
    title: str,
    xlabel: str,
    ylabel: str,
    path: str | Path,
) -> Path:
    """A histogram of values, with labelled shaded bands (low, high, label) behind it."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for (low, high, label), colour in zip(bands, ("tab:blue", "tab:grey", "tab:orange"), strict=False):
        ax.axvspan(low, high, alpha=0.15, color=colour, label=label)
    ax.hist(np.asarray(values, dtype=float), bins=bins, range=value_range, color="black", histtype="stepfilled")
    return _finish(fig, ax, title, xlabel, ylabel, path)
