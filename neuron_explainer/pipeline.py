"""Explain → simulate → score every feature, one JSON per feature, resumable; then summary.json.

Layout of an output folder (DESIGN.md contract for interpret.py):
    features/<method>_<index>.json   one per feature (written atomically; an existing one is skipped on rerun)
    summary.json                     {"scorer", "by_method": {"sae": {"mean_score", "n_features", ...}, ...}}
    cache/                           the client's answers (LLM runs only), so a rerun sends nothing twice
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from neuron_explainer.client import ChatClient, ClientConfig
from neuron_explainer.dashboard import feature_dashboard
from neuron_explainer.explain import Explainer, LLMExplainer
from neuron_explainer.intruder import intruder_score, intruder_trials
from neuron_explainer.offline import OfflineExplainer, OfflineSimulator
from neuron_explainer.records import ActivationRecord, FeatureRecord
from neuron_explainer.score import binary_scores, correlation_scores, parse_failure_rate
from neuron_explainer.simulate import LLMSimulator, Simulator
from neuron_explainer.stats import LEVEL, compare, mean_interval
from sparse_coding.errors import UserError
from sparse_coding.files import finite_or_none, read_json, write_json

log = logging.getLogger(__name__)
STANDARD_METHODS = ("sae", "neuron", "pca", "random")  # always present in summary.json's by_method
SCORERS = (
    "correlation_all",
    "correlation_top",
    "correlation_random",
    "detection_balanced_accuracy",
    "detection_auc",
    "fuzzing_balanced_accuracy",
    "fuzzing_auc",
    "intruder",
)


@dataclass
class InterpretConfig:
    api_base: str | None = None  # None: the offline explainer and simulator; else an OpenAI-compatible /v1 URL
    explainer_model: str = "gpt-4o-mini"
    simulator_model: str = "gpt-4o-mini"
    api_key_env: str = ""  # "": OPENAI_API_KEY, sent only to non-loopback hosts; a name: that key, to any host
    simulator_mode: str = "auto"  # auto | logprobs | json
    scorer: str = "correlation_all"  # the score summary.json averages as mean_score
    detection: bool = True
    fuzzing: bool = True
    intruder: bool = True  # intruder detection: k windows, one where the feature does not fire
    intruder_k: int = 5
    intruder_trials: int = 5
    active_fraction: float = 0.0  # a token is "active" above this share of the feature's max activation
    max_concurrency: int = 8  # requests in flight at once (also features in progress)
    timeout_s: float = 120.0
    max_retries: int = 8
    backoff_base_s: float = 1.0
    cache_dir: str | None = None  # None: <out>/cache
    usd_per_m_input: float = 0.0
    usd_per_m_output: float = 0.0
    seed: int = 0


def feature_path(out_dir: str | Path, method: str, feature_index: int) -> Path:
    return Path(out_dir) / "features" / f"{method}_{feature_index:06d}.json"


def _r(xs: Sequence[float] | None, nd: int = 4) -> list[float] | None:
    return None if xs is None else [round(float(x), nd) for x in xs]


def _fuzz_examples(
    records: Sequence[ActivationRecord], threshold: float, rng: np.random.Generator
) -> tuple[list[tuple[list[str], list[bool]]], list[int]]:
    """Each active record twice: highlights where the feature fires (label 1), and as many at random (label 0)."""
    examples, labels = [], []
    for r in records:
        a = np.asarray(r.activations)
        right = (a > threshold) & (a >= 0.5 * a.max())
        if not right.any() or right.all():
            continue
        wrong = np.zeros_like(right)
        wrong[rng.choice(np.flatnonzero(~right), size=min(int(right.sum()), int((~right).sum())), replace=False)] = 1
        examples += [(r.tokens, right.tolist()), (r.tokens, wrong.tolist())]
        labels += [1, 0]
    return examples, labels


async def score_feature(
    record: FeatureRecord, explainer: Explainer, simulator: Simulator, cfg: InterpretConfig
) -> dict[str, Any]:
    """Explains, simulates and scores one feature → the dict written as its JSON."""
    explanation = await explainer.explain(record)
    text = explanation.text
    scores: dict[str, float | None] = dict.fromkeys(SCORERS)
    failures: dict[str, float | None] = {"explanation": float(text is None)}
    simulated: dict[str, list[list[float] | None]] = {}
    if text is not None:
        sims = await asyncio.gather(
            *(simulator.simulate(text, r.tokens) for r in [*record.test_top, *record.test_random])
        )
        top_sim, random_sim = list(sims[: len(record.test_top)]), list(sims[len(record.test_top) :])
        simulated = {"test_top": [_r(s) for s in top_sim], "test_random": [_r(s) for s in random_sim]}
        corr = correlation_scores(
            [r.activations for r in record.test_top], top_sim, [r.activations for r in record.test_random], random_sim
        )
        scores.update({f"correlation_{k}": v for k, v in corr.items()})
        failures["simulation"] = parse_failure_rate(sims)

        threshold = cfg.active_fraction * record.max_activation
        rng = np.random.default_rng([cfg.seed, record.feature_index])
        held_active = [r for q in record.quantiles for r in q]
        if cfg.detection and held_active:
            examples = [*held_active, *record.test_random]
            labels = [1] * len(held_active) + [int(r.max_activation > threshold) for r in record.test_random]
            order = rng.permutation(len(examples))  # so the answer's position says nothing about the label
            answers = await simulator.detect(text, [examples[i].tokens for i in order])
            det = binary_scores([labels[i] for i in order], answers, simulator.decision_threshold)
            scores["detection_balanced_accuracy"], scores["detection_auc"] = det["balanced_accuracy"], det["auc"]
            failures["detection"] = det["parse_failure_rate"]
        if cfg.fuzzing and held_active:
            examples, labels = _fuzz_examples(held_active, threshold, rng)
            if examples:
                order = rng.permutation(len(examples))
                answers = await simulator.fuzz(text, [examples[i] for i in order])
                fuz = binary_scores([labels[i] for i in order], answers, simulator.decision_threshold)
                scores["fuzzing_balanced_accuracy"], scores["fuzzing_auc"] = fuz["balanced_accuracy"], fuz["auc"]
                failures["fuzzing"] = fuz["parse_failure_rate"]
    if cfg.intruder:
        trials = intruder_trials(
            record, cfg.intruder_trials, cfg.intruder_k, np.random.default_rng([cfg.seed, record.feature_index, 1])
        )
        if trials:
            guesses = await asyncio.gather(*(simulator.intruder(t.windows) for t in trials))
            scores["intruder"] = intruder_score(trials, guesses)
            failures["intruder"] = parse_failure_rate(guesses)
    return {
        "method": record.method,
        "feature_index": record.feature_index,
        "explainer": explainer.name,
        "simulator": simulator.name,
        "explanation": text,
        "patterns": explanation.patterns,
        "scores": {k: finite_or_none(v) for k, v in scores.items()},
        "parse_failures": failures,
        "simulated": simulated,
        **feature_dashboard(record, simulated),
        "record": record.to_dict(),
    }


def _build(cfg: InterpretConfig, client: ChatClient | None) -> tuple[Explainer, Simulator]:
    if client is None:
        return OfflineExplainer(), OfflineSimulator()
    return LLMExplainer(client, cfg.explainer_model), LLMSimulator(client, cfg.simulator_model, cfg.simulator_mode)


async def interpret_features_async(
    records: Sequence[FeatureRecord], out_dir: str | Path, method: str | None = None, cfg: InterpretConfig | None = None
) -> dict[str, Any]:
    """Scores every feature not already done in out_dir; gives {"done", "skipped", "failed", "client": usage}."""
    cfg = cfg or InterpretConfig()
    if cfg.scorer not in SCORERS:
        raise UserError(f"unknown scorer {cfg.scorer!r} (choose from {', '.join(SCORERS)})")
    out_dir = Path(out_dir)
    (out_dir / "features").mkdir(parents=True, exist_ok=True)
    todo = [r for r in records if not feature_path(out_dir, method or r.method, r.feature_index).is_file()]
    skipped = len(records) - len(todo)
    client = None
    if cfg.api_base:
        client = ChatClient(
            ClientConfig(
                api_base=cfg.api_base,
                api_key_env=cfg.api_key_env,
                max_concurrency=cfg.max_concurrency,
                timeout_s=cfg.timeout_s,
                max_retries=cfg.max_retries,
                backoff_base_s=cfg.backoff_base_s,
                cache_dir=cfg.cache_dir or str(out_dir / "cache"),
                usd_per_m_input=cfg.usd_per_m_input,
                usd_per_m_output=cfg.usd_per_m_output,
            )
        )
    explainer, simulator = _build(cfg, client)
    gate = asyncio.Semaphore(cfg.max_concurrency)  # features in progress, so results land on disk steadily
    bar = tqdm(total=len(todo), desc=f"interpret {method or 'features'}", disable=not todo)
    failed: list[str] = []

    async def one(record: FeatureRecord) -> None:
        async with gate:
            m = method or record.method
            try:
                result = await score_feature(record, explainer, simulator, cfg)
            except UserError as e:
                failed.append(f"{m} {record.feature_index}: {e}")
                return
            result["method"] = m
            write_json(feature_path(out_dir, m, record.feature_index), result)
            bar.update(1)

    if client is not None:
        async with client:
            await asyncio.gather(*(one(r) for r in todo))
    else:
        await asyncio.gather(*(one(r) for r in todo))
    bar.close()
    usage = asdict(client.stats) if client is not None else None
    log.info("interpret: %d features written to %s, %d already there", len(todo) - len(failed), out_dir, skipped)
    if failed:
        raise UserError(f"{len(failed)} features failed (first: {failed[0]}); rerun the same command to resume")
    return {"done": len(todo), "skipped": skipped, "failed": len(failed), "client": usage}


def interpret_features(
    records: Sequence[FeatureRecord], out_dir: str | Path, method: str | None = None, cfg: InterpretConfig | None = None
) -> dict[str, Any]:
    """Synchronous wrapper of `interpret_features_async` (one event loop per call)."""
    return asyncio.run(interpret_features_async(records, out_dir, method, cfg))


def load_feature_results(out_dir: str | Path) -> list[dict[str, Any]]:
    """Every feature JSON in out_dir/features, sorted by method and index."""
    paths = sorted((Path(out_dir) / "features").glob("*.json"))
    return [read_json(p) for p in paths]


def _mean(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return float(np.mean(vals)) if vals else None


def summarize(results: Sequence[dict[str, Any]], scorer: str = "correlation_all") -> dict[str, Any]:
    """Per-method means of every score, with a bootstrap interval on the chosen scorer's mean (mean_score,
    interval) and, when SAE features were scored, the intervals on SAE − each baseline and the verdict
    (neuron_explainer/stats.py). Features without a score are left out."""
    if scorer not in SCORERS:
        raise UserError(f"unknown scorer {scorer!r} (choose from {', '.join(SCORERS)})")
    methods = list(STANDARD_METHODS) + sorted({r["method"] for r in results} - set(STANDARD_METHODS))
    by_method, scored = {}, {}
    for m in methods:
        rs = [r for r in results if r["method"] == m]
        scored[m] = [r["scores"][scorer] for r in rs if r["scores"].get(scorer) is not None]
        by_method[m] = {
            "mean_score": _mean(scored[m]),
            "interval": mean_interval(scored[m]),
            "n_features": len(rs),
            "n_scored": len(scored[m]),
            "means": {s: _mean([r["scores"].get(s) for r in rs]) for s in SCORERS},
            "explanation_failure_rate": _mean([r["parse_failures"].get("explanation") for r in rs]),
            "simulation_failure_rate": _mean([r["parse_failures"].get("simulation") for r in rs]),
        }
    comparisons, verdict = compare({m: v for m, v in scored.items() if v})
    return {
        "scorer": scorer,
        "scorer_definition": "Pearson correlation of simulated and true activations pooled over held-out top and "
        "random records (Bills et al. 2023)"
        if scorer == "correlation_all"
        else scorer,
        "confidence": {"level": LEVEL, "method": "percentile bootstrap over features, 10 000 resamples"},
        "explainers": sorted({r["explainer"] for r in results}),
        "by_method": by_method,
        "comparisons": comparisons,
        "verdict": verdict,
    }


def write_summary(out_dir: str | Path, scorer: str = "correlation_all", extra: dict[str, Any] | None = None) -> Path:
    """summary.json over every feature JSON in out_dir (so it covers resumed runs too); gives its path."""
    summary = {**summarize(load_feature_results(out_dir), scorer), **(extra or {})}
    path = Path(out_dir) / "summary.json"
    write_json(path, summary)
    return path
