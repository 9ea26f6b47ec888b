"""neuron_explainer without any network: records, scorers on hand-computed cases, the offline explainer on
planted features, baselines, and the resumable pipeline with its summary.json contract."""

import json
import math

import numpy as np
import pytest
import torch

from neuron_explainer import (
    InterpretConfig,
    RecordConfig,
    baseline_activations,
    baseline_directions,
    build_feature_records,
    interpret_features,
    write_summary,
)
from neuron_explainer.offline import (
    OfflineExplainer,
    OfflineSimulator,
    Pattern,
    format_explanation,
    parse_explanation_patterns,
    predict,
)
from neuron_explainer.pipeline import feature_path, load_feature_results
from neuron_explainer.prompts import (
    expected_level,
    explainer_messages,
    normalize,
    parse_answers,
    parse_explanation,
    parse_simulation_json,
    parse_simulation_logprobs,
    parse_simulation_text,
)
from neuron_explainer.records import ActivationRecord, FeatureRecord, build_feature_record
from neuron_explainer.score import binary_scores, correlation_scores, pooled_correlation
from sparse_coding.errors import UserError

THE, A, NEW, YORK = 300, 301, 302, 303


def make_planted(N: int = 600, T: int = 32, seed: int = 0):
    """Token ids [N, T], vocabulary, and activations [N, T, 3]: feature 0 fires on " the"/" a", feature 1 on
    " York" after " New" (" York" and " New" also occur alone), feature 2 is sparse noise unrelated to tokens."""
    rng = np.random.default_rng(seed)
    vocab = [f" w{i}" for i in range(300)] + [" the", " a", " New", " York"]
    p = np.ones(len(vocab))
    p[[THE, A, NEW, YORK]] = [25, 20, 6, 6]
    ids = rng.choice(len(vocab), size=(N, T), p=p / p.sum())
    r, c = np.nonzero(rng.random((N, T - 1)) < 0.02)
    ids[r, c], ids[r, c + 1] = NEW, YORK
    prev = np.concatenate([np.full((N, 1), -1), ids[:, :-1]], axis=1)
    acts = np.zeros((N, T, 3), np.float32)
    acts[..., 0] = (ids == THE) * (1.0 + 0.1 * rng.standard_normal((N, T))) + (ids == A) * 0.8
    acts[..., 1] = ((ids == YORK) & (prev == NEW)) * (2 + 0.2 * rng.random((N, T)))
    acts[..., 2] = np.abs(rng.standard_normal((N, T))) * (rng.random((N, T)) < 0.1)
    return ids, vocab, acts


@pytest.fixture(scope="module")
def planted():
    ids, vocab, acts = make_planted()
    return ids, vocab, acts, build_feature_records(ids, acts, vocab, cfg=RecordConfig(window=32))


# ---- records ----------------------------------------------------------------------------------------------------


def test_records_disjoint_seeded_and_json(planted):
    ids, vocab, acts, records = planted
    for rec in records:
        assert not rec.sequences("train") & rec.sequences("test")
        all_recs = [*rec.train_top, *rec.train_random, *rec.test_top, *rec.test_random, *sum(rec.quantiles, [])]
        seqs = [r.sequence_index for r in all_recs]
        assert len(seqs) == len(set(seqs))  # no sequence twice, not even within a split
        assert len(rec.train_top) == 10 and len(rec.test_top) == 10 and len(rec.quantiles) == 5
        # a top window holds its sequence's maximum, and the tokens/activations are that row's
        for r in rec.train_top:
            row = acts[r.sequence_index, :, rec.feature_index]
            assert math.isclose(r.max_activation, float(row.max()), rel_tol=1e-5)
            assert r.tokens == [vocab[i] for i in ids[r.sequence_index, r.start : r.start + len(r.tokens)]]
        assert FeatureRecord.from_dict(json.loads(json.dumps(rec.to_dict()))) == rec
    # top examples really are the top: nothing held out beats the weakest training top example's sequence max
    rec = records[1]
    assert min(r.max_activation for r in rec.train_top + rec.test_top) >= max(
        r.max_activation for q in rec.quantiles for r in q
    )
    again = build_feature_records(ids, torch.from_numpy(acts), vocab, features=[1], cfg=RecordConfig(window=32))
    assert again[0] == records[1]  # seeded, and torch input gives the same as numpy
    other = build_feature_records(ids, acts, vocab, features=[1], cfg=RecordConfig(window=32, seed=1))[0]
    assert other.sequences("train") != records[1].sequences("train")


def test_records_one_feature_at_a_time_and_errors(planted):
    ids, vocab, acts, records = planted
    by_fn = build_feature_records(ids, lambda f: acts[:, :, f], vocab, features=[0], cfg=RecordConfig(window=32))
    assert by_fn[0] == records[0]
    with pytest.raises(UserError, match="shape"):
        build_feature_records(ids, acts[:, :, 0], vocab)
    with pytest.raises(UserError, match="NaN"):
        build_feature_record([["a", "b"]], np.array([[np.nan, 1.0]]), 0)
    with pytest.raises(UserError, match="vocabulary"):
        build_feature_records(np.array([[0, 999]]), np.zeros((1, 2, 1)), ["x"])


# ---- scorers and parsers on hand-computed cases -----------------------------------------------------------------


def test_pooled_correlation_hand_cases():
    # x = [0,1,2], y = [0,2,1]: centred [-1,0,1]·[-1,1,0] = 1, variances 2 and 2 → 0.5, pooled across records
    assert pooled_correlation([[0, 1], [2]], [[0, 2], [1]]) == pytest.approx(0.5)
    assert pooled_correlation([[0, 1], [0, 1]], [[1, 0], [0, 1]]) == pytest.approx(0.0)
    assert pooled_correlation([[0, 1, 0]], [[3, 3, 3]]) == 0.0  # constant prediction explains nothing
    assert pooled_correlation([[1, 1]], [[0, 1]]) is None  # undefined when the truth is constant
    assert pooled_correlation([[0, 1], [5, 0]], [[0, 1], None]) == pytest.approx(1.0)  # unparsed record skipped


def test_correlation_scores_top_random_all():
    # all: x = [0,2,0,1], y = [0,1,1,0] → cov 0.5, Σdx² 2.75, Σdy² 1 → 0.5 / sqrt(2.75)
    s = correlation_scores([[0, 2]], [[0, 1]], [[0, 1]], [[1, 0]])
    assert s["top"] == pytest.approx(1.0)
    assert s["random"] == pytest.approx(-1.0)
    assert s["all"] == pytest.approx(0.5 / math.sqrt(2.75))


def test_binary_scores_hand_cases():
    # predictions [1,0,1,0] → TPR 0.5, TNR 0.5; AUC: 3 of 4 positive-negative pairs ordered right
    s = binary_scores([1, 1, 0, 0], [0.9, 0.2, 0.6, 0.1])
    assert s["balanced_accuracy"] == pytest.approx(0.5) and s["auc"] == pytest.approx(0.75)
    s = binary_scores([1, 0, 1], [1.0, 0.0, None])
    assert s["parse_failure_rate"] == pytest.approx(1 / 3) and s["balanced_accuracy"] == 1.0 and s["auc"] == 1.0
    assert binary_scores([1, 1], [0.2, 0.9])["auc"] is None  # one class only


def test_prompt_normalisation_and_parsers():
    assert normalize([0, 0.5, 1.0, -1, 0.04, 0.05], 1.0) == [0, 5, 10, 0, 0, 1]
    msgs = explainer_messages([ActivationRecord([" a", "\n", "b\t"], [0.0, 1.0, 2.0])], 2.0)
    assert " a\t0\n\\n\t5\nb\\t\t10" in msgs[-1]["content"]  # one cell per token even for newline/TAB tokens
    assert parse_explanation('\nExplanation: "fires on cats"\nmore') == "fires on cats"
    assert parse_explanation("  \n ") is None
    # expected value renormalised over '0'..'10': 10·0.3/0.6 = 5
    assert expected_level([{"token": "10", "logprob": math.log(0.3)}, {"token": "0", "logprob": math.log(0.3)},
                           {"token": "x", "logprob": math.log(0.4)}]) == pytest.approx(5.0)  # fmt: skip
    content = [
        {"token": " the"}, {"token": "\t"},
        {"token": "8", "logprob": -0.1, "top_logprobs": [{"token": "8", "logprob": math.log(0.5)},
                                                          {"token": "4", "logprob": math.log(0.5)}]},
        {"token": "\n"}, {"token": " cat"}, {"token": "\t"}, {"token": "0", "logprob": 0.0}, {"token": "\n"},
    ]  # fmt: skip
    assert parse_simulation_logprobs(content, 2) == pytest.approx([6.0, 0.0])
    assert parse_simulation_logprobs(content, 3) is None
    assert parse_simulation_text("a\t3\nb\t10\n", 2) == [3.0, 10.0]
    assert parse_simulation_json('Sure! ```{"activations": [0, 12, 3]}```', 3) == [0.0, 10.0, 3.0]
    assert parse_simulation_json('{"activations": [0]}', 3) is None
    assert parse_answers('{"answers": [1, 0]}', 2) == [1.0, 0.0] and parse_answers("no", 2) is None


# ---- offline explainer / simulator ------------------------------------------------------------------------------


def test_offline_explanation_round_trip_with_awkward_tokens():
    pats = [Pattern('say "hi", ok', None, 10), Pattern("\n", None, 3), Pattern(" York", " after", 7)]
    text = format_explanation(pats)
    assert parse_explanation_patterns(text) == pats
    assert predict(pats, [" after", " York", "\n", " York"]) == [0.0, 7.0, 3.0, 0.0]
    assert parse_explanation_patterns("the model likes cats") == []


def test_planted_features_get_the_right_offline_explanation(planted):
    *_, records = planted
    texts = [OfflineExplainer().explain_sync(r).text for r in records]
    assert texts[0] == 'fires on tokens " the", " a"'
    assert texts[1] == 'fires on " York" after " New"'


def test_planted_features_score_high_and_noise_near_zero(tmp_path, planted):
    ids, vocab, acts, records = planted
    interpret_features(records, tmp_path, "sae")
    results = {r["feature_index"]: r for r in load_feature_results(tmp_path)}
    for f in (0, 1):
        s = results[f]["scores"]
        assert s["correlation_all"] >= 0.8 and s["correlation_top"] >= 0.8, s
        assert s["fuzzing_auc"] >= 0.8
    assert abs(results[2]["scores"]["correlation_all"]) < 0.2
    assert results[1]["scores"]["detection_auc"] >= 0.8  # " New York" windows are rare enough to have negatives
    assert all(r["parse_failures"]["simulation"] == 0 for r in results.values())


def test_offline_detection_and_fuzzing_scores():
    sim = OfflineSimulator()
    import asyncio

    det = asyncio.run(sim.detect('fires on " cat"', [["a", " cat"], ["a", "b"]]))
    assert det == [1.0, 0.0]
    fuz = asyncio.run(sim.fuzz('fires on " cat"', [(["a", " cat"], [False, True]), (["a", " cat"], [True, False])]))
    assert fuz == [1.0, 0.0]


# ---- baselines ----------------------------------------------------------------------------------------------------


def test_baselines_shapes_and_properties():
    rng = np.random.default_rng(0)
    sources = rng.laplace(size=(200, 16, 4)) * (rng.random((200, 16, 4)) < 0.3)  # sparse, non-Gaussian
    mixing = rng.standard_normal((4, 6))
    x = (sources @ mixing + 0.01 * rng.standard_normal((200, 16, 6))).astype(np.float32)
    assert np.array_equal(baseline_activations(x, "neuron", 3), x[..., :3])
    dirs, centre = baseline_directions(x, "pca", 4)
    assert np.allclose(dirs @ dirs.T, np.eye(4), atol=1e-4)
    a = baseline_activations(x, "pca", 4)
    assert a.shape == (200, 16, 4) and a.reshape(-1, 4).var(0)[0] >= a.reshape(-1, 4).var(0)[-1]
    ica = baseline_activations(x, "ica", 4).reshape(-1, 4)
    corr = np.abs(np.corrcoef(ica.T, sources.reshape(-1, 4).T)[:4, 4:])
    assert corr.max(axis=0).min() > 0.9  # each true source found by some ICA direction
    dirs, _ = baseline_directions(x, "random", 10, seed=1)
    assert dirs.shape == (10, 6) and np.allclose(np.linalg.norm(dirs, axis=1), 1, atol=1e-5)
    r = baseline_activations(x, "random", 10).reshape(-1, 10)
    assert (((r - r.mean(0)) ** 3).mean(0) >= 0).all()  # oriented so the heavy tail is positive
    with pytest.raises(UserError, match="at most"):
        baseline_directions(x, "pca", 7)
    with pytest.raises(UserError, match="unknown baseline"):
        baseline_directions(x, "nmf", 2)


# ---- pipeline: resume and the summary.json contract --------------------------------------------------------------


def test_pipeline_resume_and_summary_contract(tmp_path, planted):
    ids, vocab, acts, records = planted
    first = interpret_features(records[:2], tmp_path, "sae")
    assert first["done"] == 2
    feature_path(tmp_path, "sae", 0).unlink()  # as if interrupted before feature 0 was written
    second = interpret_features(records, tmp_path, "sae")
    assert second["done"] == 2 and second["skipped"] == 1  # features 0 and 2
    # baselines through the same pipeline: dense activations = the planted features plus noise dimensions
    rng = np.random.default_rng(0)
    x = np.concatenate([acts, 0.3 * rng.standard_normal(acts.shape[:2] + (5,)).astype(np.float32)], axis=-1)
    noise = rng.standard_normal(acts.shape[:2] + (8,)).astype(np.float32)  # unrelated to the tokens
    for method, dense in (("neuron", x), ("pca", x), ("random", noise)):
        feats = baseline_activations(dense, method, 3, seed=0)
        recs = build_feature_records(ids, feats, vocab, cfg=RecordConfig(window=32), method=method)
        interpret_features(recs, tmp_path, method)
    summary = json.loads(write_summary(tmp_path).read_text())
    assert summary["scorer"] == "correlation_all"
    by = summary["by_method"]
    assert set(by) >= {"sae", "neuron", "pca", "random"}
    assert by["sae"]["n_features"] == 3 and by["neuron"]["n_features"] == 3
    assert by["neuron"]["mean_score"] > 0.5  # neurons 0 and 1 are the planted features
    assert abs(by["random"]["mean_score"]) < 0.2  # random directions in token-independent noise explain nothing
    assert len(list((tmp_path / "features").glob("*.json"))) == 12
    with pytest.raises(UserError, match="unknown scorer"):
        interpret_features(records, tmp_path, "sae", InterpretConfig(scorer="vibes"))
