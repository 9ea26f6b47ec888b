"""Static HTML for a run: index.html (summary, one row per feature) and one page per feature under pages/.

No scripts, no external files: pages open from disk. Every piece of text goes through html.escape.
"""

from __future__ import annotations

import html
import io
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

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


def _cell(v: Any) -> str:
    """A metric for a table: floats to 3 decimals, missing ones as a dash."""
    return _fmt(v) if isinstance(v, float) or v is None else str(v)


def _interval(iv: Sequence[float] | None) -> str:
    return "—" if not iv else f"[{iv[0]:.3f}, {iv[1]:.3f}]"


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


def histogram_svg(
    edges: Sequence[float],
    counts: Sequence[float],
    width: float = 4.2,
    height: float = 1.5,
    x_label: str = "activation",
    y_label: str = "tokens",
    empty: str = "(never fires)",
) -> str:
    """A bar chart of a histogram (by default the activation density, activations > 0) drawn by matplotlib as inline
    SVG, its text kept as text (searchable, and read by the tests), in a div of class "histogram"."""
    if not counts:
        return f"<p>{_e(empty)}</p>"
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    with plt.rc_context({"svg.fonttype": "none", "font.size": 8}):
        fig, ax = plt.subplots(figsize=(width, height))
        ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#e67e22")
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.spines[["top", "right"]].set_visible(False)
        buf = io.StringIO()
        fig.savefig(buf, format="svg", bbox_inches="tight")
        plt.close(fig)
    svg = buf.getvalue()
    label = f"{_e(y_label)} per {_e(x_label)} bin"
    return f'<div class="histogram" role="img" aria-label="{label}">{svg[svg.index("<svg") :]}</div>'


def logits_html(logits: dict[str, list[list[Any]]]) -> str:
    """Two columns: the tokens the feature's direction promotes and suppresses most through the unembedding."""

    def column(title: str, items: list[list[Any]]) -> str:
        rows = "".join(f"<tr><td><code>{_e(repr(t))}</code></td><td>{float(v):+.3f}</td></tr>" for t, v in items)
        return f'<table class="logits"><tr><th>{_e(title)}</th><th>logit</th></tr>{rows}</table>'

    return (
        '<div class="logit-effects" style="display:flex; gap:2em">'
        f"{column('promoted', logits.get('promoted', []))}{column('suppressed', logits.get('suppressed', []))}</div>"
    )


def neighbours_html(method: str, neighbours: list[dict[str, Any]], pages: AbstractSet[str]) -> str:
    """The nearest features by direction cosine, linked where they have a page of their own."""
    items = []
    for n in neighbours:
        name = f"{method}_{int(n['index']):06d}.html"
        label = f"{_e(method)} {int(n['index'])} (cosine {float(n['cosine']):.3f})"
        items.append(f'<li><a href="{_e(name)}">{label}</a></li>' if name in pages else f"<li>{label}</li>")
    return f'<ul class="neighbours">{"".join(items)}</ul>'


def quantiles_html(quantiles: list[dict[str, Any]], max_activation: float) -> str:
    """Examples from each interval of the feature's activations ({"interval", "examples"}), highest first."""
    parts = []
    for i, q in reversed(list(enumerate(quantiles))):
        if not q["examples"]:
            continue
        lo, hi = q["interval"]
        parts.append(f"<h3>quantile {i + 1} of {len(quantiles)}: windows peaking at {lo:.3g} to {hi:.3g}</h3>")
        parts.extend(example_html(x["tokens"], x["activations"], max_activation) for x in q["examples"])
    return f'<div class="quantiles">{"".join(parts)}</div>'


def _quantile_examples(r: dict[str, Any]) -> list[dict[str, Any]]:
    """The JSON's quantile_examples, or (a feature JSON written before they existed) the record's quantiles."""
    if r.get("quantile_examples") is not None:
        return r["quantile_examples"]
    return [
        {"interval": [min(max(x["activations"]) for x in q), max(max(x["activations"]) for x in q)], "examples": q}
        for q in r["record"].get("quantiles") or []
        if q
    ]


def _page(title: str, body: str) -> str:
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f"<style>{CSS}</style></head><body>{body}</body></html>\n"
    )


def _page_name(r: dict[str, Any]) -> str:
    return f"{r['method']}_{int(r['feature_index']):06d}.html"


def feature_page(r: dict[str, Any], pages: AbstractSet[str] = frozenset()) -> str:
    """One feature: explanation, scores, activation density, logit effects, nearest features, training top
    examples, held-out examples with simulation, and examples per activation quantile."""
    rec = r["record"]
    mx = float(rec["max_activation"])
    extras = rec.get("extras") or {}
    intervals = r.get("score_intervals") or {}
    scores = "".join(
        f"<tr><th>{_e(k)}</th><td>{_fmt(v)}</td><td>{_interval(intervals.get(k))}</td></tr>"
        for k, v in r["scores"].items()
    )
    fails = "".join(f"<tr><th>{_e(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in r["parse_failures"].items())
    top = "".join(example_html(x["tokens"], x["activations"], mx) for x in rec["train_top"])
    held = []
    sims = (r.get("simulated") or {}).get("test_top") or [None] * len(rec["test_top"])
    for x, sim in zip(rec["test_top"], sims, strict=True):
        held.append(example_html(x["tokens"], x["activations"], mx))
        if sim is not None:
            held.append('<div class="sim">simulated:</div>' + example_html(x["tokens"], sim, 10.0))
    hist = rec.get("histogram") or {}
    density = r.get("density_histogram") or {}
    log_rate = density.get("log10_firing_rate")
    if extras.get("logits"):
        logits = logits_html(extras["logits"])
    else:
        why = r.get("logits_note") or extras.get("logits_note") or "unknown"
        logits = f'<p class="logits-note">No logit effects: {_e(why)}</p>'
    logits = f"<h2>Logit effects (direction through the unembedding)</h2>{logits}"
    shares = r.get("head_shares")
    heads_html = (
        "<h2>Share of the direction per attention head</h2><p>"
        + ", ".join(f"head {h}: {100 * v:.1f} %" for h, v in enumerate(shares))
        + "</p>"
        if shares
        else ""
    )
    near = extras.get("neighbours")
    near_html = (
        f"<h2>Nearest features (direction cosine)</h2>{neighbours_html(r['method'], near, pages)}" if near else ""
    )
    body = (
        f'<p><a href="../index.html">← all features</a></p>'
        f"<h1>{_e(r['method'])} feature {_e(r['feature_index'])}</h1>"
        f'<p class="expl"><b>Explanation:</b> {_e(r["explanation"] if r["explanation"] is not None else "(none)")}</p>'
        f"<p>explainer {_e(r['explainer'])}, simulator {_e(r['simulator'])}; max activation {mx:.4g}, "
        f"fires on {100 * float(rec['firing_rate']):.3g} % of tokens"
        f"{'' if log_rate is None else f' (log10 density {log_rate:.2f})'}</p>"
        f'<h2>Scores</h2><table class="scores"><tr><th>scorer</th><th>score</th><th>95% interval (windows '
        f"resampled)</th></tr>{scores}</table><h3>Parse failures</h3><table>{fails}</table>"
        f"<h2>Activation density (tokens where it fires)</h2>"
        f"{histogram_svg(hist.get('edges', []), hist.get('counts', []))}{logits}{heads_html}{near_html}"
        f'<h2>Top examples (shown to the explainer)</h2><div class="top-examples">{top}</div>'
        f'<h2>Held-out top examples (true, then simulated)</h2><div class="held-out">{"".join(held)}</div>'
        f"<h2>Examples by activation quantile (held out)</h2>{quantiles_html(_quantile_examples(r), mx)}"
    )
    return _page(f"{r['method']} feature {r['feature_index']}", body)


def sae_page(data: dict[str, Any], feature_pages: Sequence[str]) -> str:
    """The whole SAE (sae.json): its run metrics, how many latents never fire, the histograms of its latents' log10
    firing rates and of its L0 per token, and a link to every feature page."""
    metrics = data.get("metrics")
    rows = (
        "".join(f"<tr><th>{_e(k)}</th><td>{_e(_cell(v))}</td></tr>" for k, v in metrics.items())
        if metrics
        else f"<tr><td>{_e(data.get('metrics_note') or 'no metrics')}</td></tr>"
    )
    rates, l0 = data.get("firing_rate_histogram") or {}, data.get("l0_histogram") or {}
    rate_svg = histogram_svg(rates.get("edges", []), rates.get("counts", []), x_label="log10 firing rate",
                             y_label="latents", empty="(no latent fires)")  # fmt: skip
    l0_svg = histogram_svg(l0.get("edges", []), l0.get("counts", []), x_label="active latents", y_label="tokens",
                           empty="(no tokens)")  # fmt: skip
    links = "".join(f'<li><a href="pages/{_e(p)}">{_e(p.removesuffix(".html"))}</a></li>' for p in feature_pages)
    mean_l0 = "—" if data.get("mean_l0") is None else f"{data['mean_l0']:.2f}"
    body = (
        f'<p><a href="index.html">← all features</a></p><h1>SAE {_e(Path(str(data.get("sae_dir", ""))).name)}</h1>'
        f"<p>{_e(data.get('n_latents'))} latents over {_e(data.get('tokens'))} tokens: "
        f'<b class="dead">{_e(data.get("dead_latents"))} never fire</b>; mean L0 {mean_l0}</p>'
        f'<h2>Run metrics</h2><table class="metrics">{rows}</table>'
        f"<h2>Latent density (log10 firing rate)</h2>{rate_svg}<h2>L0 per token</h2>{l0_svg}"
        f'<h2>Feature pages</h2><ul class="feature-links">{links}</ul>'
    )
    return _page("SAE overview", body)


def summary_html(summary: dict[str, Any], scorer: str) -> str:
    """The per-method table with each mean's interval, the SAE − baseline comparisons and the verdict."""
    level = (summary.get("confidence") or {}).get("level", 0.95)
    interval = _interval
    rows = "".join(
        f"<tr><td>{_e(m)}</td><td>{_fmt(s.get('mean_score'))}</td><td>{interval(s.get('interval'))}</td>"
        f"<td>{_e(s.get('n_scored', s.get('n_features')))}</td></tr>"
        for m, s in summary.get("by_method", {}).items()
    )
    comps = "".join(
        f"<tr><td>SAE − {_e(m)}</td><td>{_fmt(c.get('difference'))}</td><td>{interval(c.get('interval'))}</td>"
        f"<td>{_e(c.get('outcome'))}</td></tr>"
        for m, c in (summary.get("comparisons") or {}).items()
    )
    return (
        f'<h2>By method ({_e(scorer)})</h2><table class="by-method"><tr><th>method</th><th>mean score</th>'
        f"<th>{level:.0%} interval</th><th>features scored</th></tr>{rows}</table>"
        + (
            f'<h3>Differences</h3><table class="comparisons"><tr><th>difference</th><th>mean</th>'
            f"<th>{level:.0%} interval</th><th>outcome</th></tr>{comps}</table>"
            if comps
            else ""
        )
        + (f'<p class="verdict"><b>Verdict:</b> {_e(summary["verdict"])}</p>' if summary.get("verdict") else "")
    )


def write_html(out_dir: str | Path, summary: dict[str, Any] | None = None, scorer: str = "correlation_all") -> Path:
    """Writes out_dir/index.html and out_dir/pages/*.html from the feature JSONs (and summary.json when there is
    one); gives index.html's path."""
    out_dir = Path(out_dir)
    if summary is None and (out_dir / "summary.json").is_file():
        summary = read_json(out_dir / "summary.json")
    results = load_feature_results(out_dir)
    pages = out_dir / "pages"
    pages.mkdir(parents=True, exist_ok=True)
    names = {_page_name(r) for r in results}
    for r in tqdm(results, desc="feature pages", disable=len(results) < 50):
        (pages / _page_name(r)).write_text(feature_page(r, names), encoding="utf-8")
    overview_link = ""
    if (out_dir / "sae.json").is_file():
        sae_pages = sorted(_page_name(r) for r in results if r["method"] == "sae")
        (out_dir / "sae.html").write_text(sae_page(read_json(out_dir / "sae.json"), sae_pages), encoding="utf-8")
        overview_link = '<p><a href="sae.html">the whole SAE: density, L0, dead latents, metrics</a></p>'
    overview = ""
    if summary:
        scorer = summary.get("scorer", scorer)
        overview = summary_html(summary, scorer)
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
        f"<h1>Feature interpretations</h1>{overview_link}{overview}<h2>Features</h2>"
        f"<table><tr><th>method</th><th>feature</th><th>{_e(key)}</th><th>explanation</th><th>top example</th></tr>"
        f"{''.join(rows)}</table>"
    )
    index = out_dir / "index.html"
    index.write_text(_page("Feature interpretations", body), encoding="utf-8")
    return index
