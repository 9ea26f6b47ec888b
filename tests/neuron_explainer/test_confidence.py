"""Bootstrap intervals and verdicts, and the intruder scorer, on cases whose answers are known."""

import numpy as np
import pytest

from neuron_explainer.intruder import intruder_score, intruder_trials, offline_guess
from neuron_explainer.records import ActivationRecord, FeatureRecord
from neuron_explainer.stats import compare, difference_interval, mean_interval


def test_mean_interval_covers_the_mean_and_narrows_with_more_features():
    rng = np.random.default_rng(0)
    small, large = rng.normal(0.5, 0.2, 25), rng.normal(0.5, 0.2, 400)
    lo, hi = mean_interval(small)
    assert lo < small.mean() < hi
    lo2, hi2 = mean_interval(large)
    assert (hi2 - lo2) < (hi - lo) / 2.5  # ∝ 1/√n: 4× narrower expected
    # the percentile interval of a mean is close to the normal one, ± 1.96 standard errors
    assert hi2 - lo2 == pytest.approx(2 * 1.96 * large.std() / np.sqrt(400), rel=0.1)
    assert mean_interval([0.3]) is None
    assert mean_interval([0.3, 0.3, 0.3]) == [0.3, 0.3]  # no spread, no width


def test_comparisons_and_verdict():
    rng = np.random.default_rng(1)
    scores = {
        "sae": rng.normal(0.70, 0.1, 60),
        "neuron": rng.normal(0.40, 0.1, 60),  # far below: beaten
        "ica": rng.normal(0.69, 0.1, 60),  # within noise: a tie
        "oracle": rng.normal(0.95, 0.1, 60),  # far above: the SAE loses
        "empty": [0.5],  # one feature: not compared
    }
    comparisons, verdict = compare(scores)
    assert comparisons["neuron"]["outcome"] == "beats" and comparisons["neuron"]["interval"][0] > 0
    assert comparisons["ica"]["outcome"] == "ties with"
    assert comparisons["oracle"]["outcome"] == "loses to"
    assert comparisons["empty"]["outcome"] == "not compared"
    assert verdict.startswith("SAE features beats neuron; loses to oracle; ties with ica")
    lo, hi = difference_interval(scores["sae"], scores["neuron"])
    assert lo < scores["sae"].mean() - scores["neuron"].mean() < hi
    assert compare({"sae": [0.1, 0.2]})[1] == "not enough scored features to compare"


def _rec(tokens, acts, seq):
    return ActivationRecord(tokens=tokens, activations=acts, sequence_index=seq)


def _feature(fires_on: str | None) -> FeatureRecord:
    """A feature firing on `fires_on` in every window (None: on a different random token in each)."""
    rng = np.random.default_rng(0)
    words = [f" w{i}" for i in range(50)]
    firing = []
    for s in range(12):
        toks = list(rng.choice(words, 8))
        hot = fires_on if fires_on is not None else f" odd{s}"
        toks[3] = hot
        firing.append(_rec(toks, [1.0 if t == hot else 0.0 for t in toks], s))
    quiet = [_rec(list(rng.choice(words, 8)), [0.0] * 8, 100 + s) for s in range(6)]
    return FeatureRecord(0, "sae", 1.0, 0.1, quantiles=[firing[:6], firing[6:]], test_random=quiet)


def test_intruder_trials_and_the_offline_judge():
    rng = np.random.default_rng(0)
    trials = intruder_trials(_feature(" the"), n_trials=20, k=5, rng=rng)
    assert len(trials) == 20 and all(len(t.windows) == 5 for t in trials)
    for t in trials:  # the intruder is marked as often as the others, so counting marks gives nothing away
        assert sum(t.windows[t.intruder][1]) == 1 and all(sum(m) == 1 for _, m in t.windows)
    guesses = [offline_guess(t.windows, np.random.default_rng(i)) for i, t in enumerate(trials)]
    assert intruder_score(trials, guesses) == 1.0  # a feature that always fires on " the": the intruder stands out
    incoherent = intruder_trials(_feature(None), n_trials=200, k=5, rng=np.random.default_rng(1))
    guesses = [offline_guess(t.windows, np.random.default_rng(i)) for i, t in enumerate(incoherent)]
    assert intruder_score(incoherent, guesses) == pytest.approx(0.2, abs=0.08)  # chance: 1/k
    assert intruder_score(trials, [None] * 20) == 0.0 and intruder_score([], []) is None


def test_no_trials_without_enough_windows():
    feature = _feature(" the")
    feature.quantiles = [feature.quantiles[0][:3]]
    assert intruder_trials(feature, 5, 5, np.random.default_rng(0)) == []


def test_a_features_score_interval_is_the_bootstrap_of_its_pooled_correlation_over_windows():
    """The vectorised interval (summed per-window moments) equals resampling whole windows and scoring each
    resample with score.pooled_correlation, draw for draw."""
    from neuron_explainer.score import pooled_correlation
    from neuron_explainer.stats import SEED, correlation_interval

    rng = np.random.default_rng(3)
    true = [rng.random(12) * (rng.random(12) < 0.4) for _ in range(9)]
    pred = [t + rng.normal(0, 0.3, 12) for t in true]
    pred[4] = None  # an unparsed simulation: left out, as the score leaves it out
    n_boot = 300
    lo, hi = correlation_interval(true, pred, n_boot=n_boot)
    kept = [(t, p) for t, p in zip(true, pred, strict=True) if p is not None]
    draws = np.random.default_rng(SEED).multinomial(len(kept), np.full(len(kept), 1 / len(kept)), size=n_boot)
    scores = []
    for counts in draws:
        picked = [w for w, c in zip(kept, counts, strict=True) for _ in range(c)]
        scores.append(pooled_correlation([t for t, _ in picked], [p for _, p in picked]))
    assert [lo, hi] == pytest.approx([np.percentile(scores, 2.5), np.percentile(scores, 97.5)], abs=1e-9)
    assert lo < pooled_correlation(true, pred) < hi
    assert correlation_interval(true[:1], pred[:1]) is None  # one window: nothing to resample


def test_the_dashboard_keys_of_a_feature():
    from neuron_explainer.dashboard import feature_dashboard
    from neuron_explainer.records import RecordConfig, build_feature_record

    rng = np.random.default_rng(0)
    acts = rng.random((80, 10)) * (rng.random((80, 10)) < 0.3)
    tokens = [[f"t{i}" for i in range(10)] for _ in range(80)]
    rec = build_feature_record(tokens, acts, 5, RecordConfig(window=10, n_quantiles=4))
    rec.extras = {"neighbours": [{"index": 2, "cosine": 0.7}], "logits_note": "no head here"}
    d = feature_dashboard(rec, {})
    assert d["density_histogram"]["log10_firing_rate"] == pytest.approx(np.log10(rec.firing_rate))
    assert sum(d["density_histogram"]["counts"]) == int((acts > 0).sum())
    assert [len(q["examples"]) for q in d["quantile_examples"]] == [len(q) for q in rec.quantiles]
    for q in d["quantile_examples"]:  # each interval brackets its examples' peaks
        lo, hi = q["interval"]
        assert all(lo <= max(x["activations"]) <= hi for x in q["examples"])
    assert [q["interval"][0] for q in d["quantile_examples"]] == sorted(
        q["interval"][0] for q in d["quantile_examples"]
    )
    assert d["top_logits"] is None and d["bottom_logits"] is None and d["logits_note"] == "no head here"
    assert d["neighbours"] == [{"index": 2, "cosine": 0.7}]
    assert d["score_intervals"] == dict.fromkeys(("correlation_top", "correlation_random", "correlation_all"))
