"""The dashboard data each feature's JSON carries and its page shows, under the names feature dashboards use
(Neuronpedia, SAEDashboard): the activation density, examples by activation interval, the logit effects, the nearest
features, and the explanation's score with its interval. Plain data from the record and its scores."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

from neuron_explainer.records import FeatureRecord
from neuron_explainer.stats import correlation_interval

CORRELATIONS = ("correlation_top", "correlation_random", "correlation_all")


def feature_dashboard(record: FeatureRecord, simulated: dict[str, list[list[float] | None]]) -> dict[str, Any]:
    """Gives the dashboard keys of a feature's JSON:
    - density_histogram: {"firing_rate", "log10_firing_rate" (null when it never fires), "edges", "counts"}, the
      histogram of its activations where it fires;
    - quantile_examples: [{"interval": [low, high], "examples": [...]}], held-out windows drawn from bins of the
      per-window maximum activation, lowest bin first;
    - top_logits, bottom_logits: [[token, logit], ...] the direction promotes / suppresses through the unembedding,
      or null, with logits_note saying why (the caller's extras);
    - neighbours: [{"index", "cosine"}] nearest features by direction;
    - head_shares: at an attention-heads hook (attn_z), the direction's share per head (sums to 1), else absent;
    - score_intervals: {scorer: [low, high]} for the correlation scores, a bootstrap over the scored windows."""
    extras, rate = record.extras, record.firing_rate
    logits = extras.get("logits") or {}
    windows = {"correlation_top": record.test_top, "correlation_random": record.test_random}
    windows["correlation_all"] = [*record.test_top, *record.test_random]
    sims = {"correlation_top": simulated.get("test_top") or [None] * len(record.test_top),
            "correlation_random": simulated.get("test_random") or [None] * len(record.test_random)}  # fmt: skip
    sims["correlation_all"] = [*sims["correlation_top"], *sims["correlation_random"]]
    return {
        "density_histogram": {
            "firing_rate": rate,
            "log10_firing_rate": math.log10(rate) if rate > 0 else None,
            **record.histogram,
        },
        "quantile_examples": [
            {"interval": iv, "examples": [asdict(r) for r in q]}
            for iv, q in zip(record.quantile_intervals, record.quantiles, strict=False)
        ],
        "top_logits": logits.get("promoted"),
        "bottom_logits": logits.get("suppressed"),
        "logits_note": None if logits else extras.get("logits_note", "no path to the logits was given"),
        "neighbours": extras.get("neighbours", []),
        **({"head_shares": extras["head_shares"]} if "head_shares" in extras else {}),
        "score_intervals": {
            k: correlation_interval([r.activations for r in windows[k]], sims[k]) for k in CORRELATIONS
        },
    }
