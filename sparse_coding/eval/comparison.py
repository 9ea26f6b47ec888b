"""Architectures side by side on toy data with known structure: every SAE's recovery numbers as a markdown table
(comparison.md, the README's hierarchy table), and for each architecture's best SAE (highest MCC) a plot of
absorption per hierarchy depth (absorption_by_depth.png)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sparse_coding.eval.plots import grouped_bars
from sparse_coding.files import write_json, write_text

COLUMNS = (  # (header, results key, format)
    ("L0", "l0", "{:.1f}"),
    ("FVU", "fvu", "{:.3f}"),
    ("MCC", "mcc", "{:.3f}"),
    ("MMCS", "mmcs", "{:.3f}"),
    ("parents found", "parents_recovered", "{:.2f}"),
    ("parents F1", "parents_f1", "{:.2f}"),
    ("children found", "children_recovered", "{:.2f}"),
    ("children F1", "children_f1", "{:.2f}"),
    ("absorption", "absorption", "{:.2f}"),
    ("split", "splitting", "{:.2f}"),
)


def best_per_arch(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Gives each architecture's row with the highest MCC (rows without one are skipped)."""
    best: dict[str, dict[str, Any]] = {}
    for r in runs:
        if r.get("mcc") is not None and (r["arch"] not in best or r["mcc"] > best[r["arch"]]["mcc"]):
            best[r["arch"]] = r
    return best


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    v = row.get(key)
    return "—" if v is None else fmt.format(v)


def comparison_table(runs: list[dict[str, Any]]) -> str:
    """Markdown: one line per SAE, grouped by architecture, knob ascending; "found" is the share of those
    features whose best decoder cosine exceeds the threshold, F1 that of their best-detecting latent."""
    head = "| arch | knob | d_sae | " + " | ".join(h for h, _, _ in COLUMNS) + " |"
    lines = [head, "|" + " --- |" * (len(COLUMNS) + 3)]
    for r in sorted(runs, key=lambda r: (r["arch"], r["dict_size"], r[r["knob"]])):
        cells = [_cell(r, key, fmt) for _, key, fmt in COLUMNS]
        lines.append(f"| {r['arch']} | {r['knob']}={r[r['knob']]:.4g} | {r['dict_size']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_comparison(runs: list[dict[str, Any]], out_dir: Path) -> str:
    """Writes comparison.md, comparison.json and absorption_by_depth.png; gives the table."""
    best = best_per_arch(runs)
    table = comparison_table(runs)
    write_text(out_dir / "comparison.md", table)
    write_json(out_dir / "comparison.json", {"best_by_mcc": best})
    depths = {arch: r["absorption_by_depth"] for arch, r in best.items() if r.get("absorption_by_depth")}
    if depths:
        grouped_bars(
            depths,
            "absorption of parent latents (best SAE per architecture)",
            "depth of the parent in its tree (0: root)",
            "share of child firings with the parent latent silent",
            out_dir / "absorption_by_depth.png",
        )
    return table
