"""Static HTML for a run: index.html (summary, one row per feature) and one page per feature under pages/.

No scripts, no external files: pages open from disk. Every piece of text goes through html.escape.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from neuron_explainer.pipeline import SCORERS, load_feature_results
from sparse_coding.files import read_json

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 1100px; }
table { border-collapse: collapse; } td, th { padding: 2px 8px; border-bottom: 1px solid #ddd; text-align: left; }
.example { font-family: monospace; white-space: pre-wrap; line-height: 1.7; margin: 4px 0; padding: 4px;
  border: 1px solid #eee; }
.tok { border-radius: 2px; }
.expl { font-size: 1.1em; margin: 0.5em 0; }
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def _shade(a: float, max_activation: float) -> str:
    alpha = 0.0 if max_activation <= 0 else min(1.0, max(0.0, a / max_activation))
    return f"background-color: rgba(255, 120, 0, {alpha:.2f})"


def example_html(tokens: Sequence[str], activations: Sequence[float], max_activation: float) -> str:
    """One context window, each token a span shaded by its activation (value in the tooltip)."""
    spans = []
    for tok, a in zip(tokens, activations, strict=True):
        shown = tok.replace("\n", "⏎\n")
        spans.append(
            f'<span class="tok" style="{_shade(a, max_activation)}" title="{_e(f"{a:.3g}")}">{_e(shown)}</span>'
        )
    return f'<div class="example">{"".join(spans)}</div>'


def histogram_svg(edges: Sequence[float], counts: Sequence[float], width: int = 360, height: int = 90) -> str:
    """Inline SVG bar chart of the activation histogram (activations > 0)."""
    if not counts:
        return "<p>(never fires)</p>"
    top = max(counts) or 1.0
    w = width / len(counts)
    bars = "".join(
        f'<rect x="{i * w:.1f}" y="{height - height * c / top:.1f}" width="{max(w - 1, 1):.1f}" '
        f'height="{height * c / top:.1f}" fill="#e67e22"><title>{_e(f"{edges[i]:.3g}–{edges[i + 1]:.3g}: {int(c)}")}'
        f"</title></rect>"
        for i, c in enumerate(counts)
    )
    label = f"0 … {edges[-1]:.3g}" if edges else ""
    return (
        f'<svg class="histogram" width="{width}" height="{height + 16}" role="img" aria-label="activation histogram">'
        f'{bars}<text x="0" y="{height + 13}" font-size="11">{_e(label)}</text></svg>'
    )


def _page(title: str, body: str) -> str:
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f"<style>{CSS}</style></head><body>{body}</body></html>\n"
    )


def _page_name(r: dict[str, Any]) -> str:
    return f"{r['method']}_{int(r['feature_index']):06d}.html"


def feature_page(r: dict[str, Any]) -> str:
    """One feature: explanation, scores, histogram, training top examples, held-out examples with simulation."""
    rec = r["record"]
    mx = float(rec["max_activation"])
    scores = "".join(f"<tr><th>{_e(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in r["scores"].items())
    fails = "".join(f"<tr><th>{_e(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in r["parse_failures"].items())
    top = "".join(example_html(x["tokens"], x["activations"], mx) for x in rec["train_top"])
    held = []
    sims = (r.get("simulated") or {}).get("test_top") or [None] * len(rec["test_top"])
    for x, sim in zip(rec["test_top"], sims, strict=True):
        held.append(example_html(x["tokens"], x["activations"], mx))
        if sim is not None:
            held.append('<div class="sim">simulated:</div>' + example_html(x["tokens"], sim, 10.0))
    hist = rec.get("histogram") or {}
    body = (
        f'<p><a href="../index.html">← all features</a></p>'
        f"<h1>{_e(r['method'])} feature {_e(r['feature_index'])}</h1>"
        f'<p class="expl"><b>Explanation:</b> {_e(r["explanation"] if r["explanation"] is not None else "(none)")}</p>'
        f"<p>explainer {_e(r['explainer'])}, simulator {_e(r['simulator'])}; max activation {mx:.4g}, "
        f"firing rate {float(rec['firing_rate']):.4g}</p>"
        f"<h2>Scores</h2><table>{scores}</table><h3>Parse failures</h3><table>{fails}</table>"
        f"<h2>Activation histogram</h2>{histogram_svg(hist.get('edges', []), hist.get('counts', []))}"
        f'<h2>Top examples (shown to the explainer)</h2><div class="top-examples">{top}</div>'
        f'<h2>Held-out top examples (true, then simulated)</h2><div class="held-out">{"".join(held)}</div>'
    )
    return _page(f"{r['method']} feature {r['feature_index']}", body)


def write_html(out_dir: str | Path, summary: dict[str, Any] | None = None, scorer: str = "correlation_all") -> Path:
    """Writes out_dir/index.html and out_dir/pages/*.html from the feature JSONs (and summary.json when there is
    one); gives index.html's path."""
    out_dir = Path(out_dir)
    if summary is None and (out_dir / "summary.json").is_file():
        summary = read_json(out_dir / "summary.json")
    results = load_feature_results(out_dir)
    pages = out_dir / "pages"
    pages.mkdir(parents=True, exist_ok=True)
    for r in results:
        (pages / _page_name(r)).write_text(feature_page(r), encoding="utf-8")
    summary_html = ""
    if summary:
        scorer = summary.get("scorer", scorer)
        rows = "".join(
            f"<tr><td>{_e(m)}</td><td>{_fmt(s.get('mean_score'))}</td><td>{_e(s.get('n_features'))}</td></tr>"
            for m, s in summary.get("by_method", {}).items()
        )
        summary_html = (
            f"<h2>By method ({_e(scorer)})</h2><table><tr><th>method</th><th>mean score</th><th>features</th></tr>"
            f"{rows}</table>"
        )
    key = scorer if scorer in SCORERS else "correlation_all"
    rows = []
    for r in sorted(results, key=lambda r: -(r["scores"].get(key) if r["scores"].get(key) is not None else -9)):
        rec = r["record"]
        first = rec["train_top"][0] if rec["train_top"] else None
        ex = example_html(first["tokens"], first["activations"], float(rec["max_activation"])) if first else ""
        rows.append(
            f'<tr><td>{_e(r["method"])}</td><td><a href="pages/{_e(_page_name(r))}">{_e(r["feature_index"])}</a></td>'
            f"<td>{_fmt(r['scores'].get(key))}</td><td>{_e(r['explanation'] or '')}</td><td>{ex}</td></tr>"
        )
    body = (
        f"<h1>Feature interpretations</h1>{summary_html}<h2>Features</h2>"
        f"<table><tr><th>method</th><th>feature</th><th>{_e(key)}</th><th>explanation</th><th>top example</th></tr>"
        f"{''.join(rows)}</table>"
    )
    index = out_dir / "index.html"
    index.write_text(_page("Feature interpretations", body), encoding="utf-8")
    return index
