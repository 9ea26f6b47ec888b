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
