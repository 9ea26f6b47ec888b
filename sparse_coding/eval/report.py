"""What every sweep writes: one results row per SAE, the SAEs themselves, and grid heatmaps."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sparse_coding.eval import metrics
from sparse_coding.eval.plots import heatmap
from sparse_coding.files import finite_or_none
from sparse_coding.saes import SAE, SAES
from sparse_coding.saes.saelens import save_sae


def sweep_rows(
    stacks: list[SAE],
    stats: list[metrics.ReconstructionStats],
    ratios: list[float],
    threshold: float,
    extra: Callable[[int, int], dict[str, Any]] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Gives one row per SAE (stack i, model m): its architecture, knob (name and value), size and metrics, plus
    extra(i, m). Stacks come architecture by architecture, each with one stack per ratio, smallest first."""
    rows = []
    knob_names = sorted({cls.knob for cls in SAES.values()})
    # rows by architecture, then grid point, then size
    pairs = sorted(
        ((i, m) for i in range(len(stacks)) for m in range(stacks[i].n_models)),
        key=lambda p: (p[0] // len(ratios), p[1], p[0]),
    )
    for i, m in tqdm(pairs, desc="metrics", disable=not progress):
        sae, st = stacks[i], stats[i]
        larger = None
        if i + 1 < len(stacks) and stacks[i + 1].architecture == sae.architecture:
            larger = metrics.mmcs_with_larger(sae.decoder()[m].detach(), stacks[i + 1].decoder()[m].detach(), threshold)
        row = {
            "arch": sae.architecture,
            "knob": sae.knob,
            **dict.fromkeys(knob_names),  # every row has every knob's column (null where another arch's)
            **sae.hparams(m),
            "dict_ratio": ratios[i % len(ratios)],
            "dict_size": sae.d_sae,
            "name": sae.name(m),
            "dead_features": int(st.dead_features[m]),
            "fvu": float(st.fvu[m]),
            "mse": float(st.mse[m]),
            "l0": float(st.l0[m]),
            "mmcs_with_larger": None if larger is None else larger["plain"],
            "mmcs_with_larger_hungarian": None if larger is None else larger["hungarian"],
            "mmcs_with_larger_share_above": None if larger is None else larger["share_above"],
            **(extra(i, m) if extra else {}),
        }
        # JSON has no NaN: a metric that cannot be computed (e.g. FVU of constant activations) is written as null
        rows.append({k: finite_or_none(v) if isinstance(v, float) else v for k, v in row.items()})
    return rows


def save_saes(
    stacks: list[SAE], stats: list[metrics.ReconstructionStats], folder: Path, metadata: dict[str, Any]
) -> None:
    """Writes every SAE of every stack as a SAELens folder under `folder`, with its feature densities."""
    for sae, st in zip(stacks, stats, strict=True):
        for m in range(sae.n_models):
            save_sae(folder / sae.name(m), sae, m, metadata, st.feature_density[m])


def plot_grid(runs: list[dict[str, Any]], key: str, title: str, path: Path, fmt: str = "{:.2f}") -> None:
    """Heatmap of one metric over the sweep: rows are the knob's values (l1_alpha, k, ...), columns the
    dictionary ratio."""
    knob = runs[0]["knob"]
    rows = sorted({r[knob] for r in runs})
    cols = sorted({r["dict_ratio"] for r in runs})
    cell = {(r[knob], r["dict_ratio"]): r.get(key) for r in runs}
    grid = [[cell.get((a, b)) for b in cols] for a in rows]
    heatmap(grid, [f"{v:.3g}" for v in rows], [f"{v:g}" for v in cols], title, path, row_name=knob, fmt=fmt)
