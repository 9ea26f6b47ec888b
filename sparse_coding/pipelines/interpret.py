"""Autointerp of a trained SAE against baselines on the same stored activations: feature records from the
held-out chunks, explanations, simulations and scores through `neuron_explainer`, summary and HTML."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from neuron_explainer import (
    InterpretConfig,
    RecordConfig,
    baseline_activations,
    build_feature_records,
    interpret_features,
    write_html,
    write_summary,
)
from neuron_explainer.baselines import METHODS as BASELINES
from neuron_explainer.client import ClientConfig, resolve_api_key
from neuron_explainer.pipeline import SCORERS
from sparse_coding.activations.store import ActivationDataset
from sparse_coding.config import Config, option
from sparse_coding.errors import UserError
from sparse_coding.files import read_json, write_json
from sparse_coding.models.language_model import load_tokenizer
from sparse_coding.saes.saelens import load_sae
from utils import claim_folder


@dataclass
class InterpretRunConfig(Config):
    sae_dir: str = option("", "one SAE folder; empty: chosen from --run_dir")
    run_dir: str = option("", "a run.py folder; empty: the newest under outputs/ with results.json")
    out: str = option("", "output folder; empty: <run_dir>/interpret_<sae name>/")
    n_features: int = option(50, "SAE features explained (a seeded sample of those that fire)", gt=0)
    n_baseline_features: int = option(0, "features per baseline; 0: as many as n_features", ge=0)
    baselines: list[str] = option(list(BASELINES), "baseline methods scored beside the SAE", choices=BASELINES)
    max_rows: int = option(512, "context rows of stored activations used (held-out chunks first)", gt=0)
    window: int = option(32, "tokens per example shown to the explainer", gt=0)
    api_base: str = option("", "an OpenAI-compatible /v1 endpoint; empty: the offline explainer and simulator")
    api_key_env: str = option(
        "",
        "environment variable whose API key is sent; empty: OPENAI_API_KEY, sent only to non-loopback hosts (name "
        "one for a local server that needs a key)",
    )
    explainer_model: str = option("gpt-4o-mini", "the model that writes explanations (with --api_base)")
    simulator_model: str = option("gpt-4o-mini", "the model that predicts activations from them (with --api_base)")
    max_concurrency: int = option(8, "requests in flight at once", gt=0)
    scorer: str = option("correlation_all", "the score summary.json ranks methods by", choices=SCORERS)
    seed: int = option(0, "random seed of the feature sample and the examples", ge=0)


def newest_run(root: Path = Path("outputs")) -> Path:
    runs = sorted(
        (p.parent for p in root.glob("*/results.json") if (p.parent / "saes").is_dir()), key=lambda p: p.stat().st_mtime
    )
    runs = [r for r in runs if read_json(r / "results.json").get("activations_dir")]
    if not runs:
        raise UserError("no run.py results under outputs/; run `python run.py` first or pass --sae_dir")
    return runs[-1]


def choose_sae(run_dir: Path) -> Path:
    """The SAE of a run with the best CE loss recovered among those with L0 ≤ 32 (else the lowest FVU)."""
    runs = read_json(run_dir / "results.json")["runs"]
    sparse = [r for r in runs if r["l0"] <= 32 and r["dead_features"] < r["dict_size"]] or runs
    key = "ce_loss_recovered" if all(r.get("ce_loss_recovered") is not None for r in sparse) else None
    best = max(sparse, key=lambda r: r[key]) if key else min(sparse, key=lambda r: r["fvu"])
    return run_dir / "saes" / best["name"]


def load_rows(data: ActivationDataset, max_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gives (tokens [N, T], activations [N, T, d]) from the last chunks backwards (held-out first); positions
    the store left out (excluded special tokens) have zero activations."""
    if data.from_files:
        raise UserError(f"{data.folder} holds your own activation files, not context rows of text to show")
    toks, acts, n = [], [], 0
    for i in reversed(range(data.n_chunks)):
        chunk = data.load_chunk(i)
        t = chunk.tokens.long()
        dense = torch.zeros(*t.shape, data.d)
        dense[chunk.kept] = chunk.activations.float()
        toks.append(t)
        acts.append(dense)
        n += t.shape[0]
        if n >= max_rows:
            break
    return torch.cat(toks)[:max_rows], torch.cat(acts)[:max_rows]


def run_interpret(cfg: InterpretRunConfig) -> dict[str, Any]:
    if cfg.api_base:  # a missing key is said now, before any work, not after the records are built
        resolve_api_key(ClientConfig(api_base=cfg.api_base, api_key_env=cfg.api_key_env))
    sae_dir = Path(cfg.sae_dir) if cfg.sae_dir else choose_sae(Path(cfg.run_dir) if cfg.run_dir else newest_run())
    sae, sae_cfg = load_sae(sae_dir)
    meta = sae_cfg.get("metadata", {})
    if not meta.get("activations_dir") or not meta.get("model_name"):
        raise UserError(f"{sae_dir}'s cfg.json names no stored activations or model; was it trained by run.py?")
    data = ActivationDataset.open(meta["activations_dir"])
    tokenizer = load_tokenizer(meta["model_name"])
    tokens, dense = load_rows(data, cfg.max_rows)
    if dense.shape[-1] != sae.d_in:
        raise UserError(f"the stored activations have d={dense.shape[-1]}, the SAE expects d_in={sae.d_in}")
    out = Path(cfg.out) if cfg.out else sae_dir.parent.parent / f"interpret_{sae_dir.name}"
    claim_folder(out, "interpret")
    # Finished features are reused on a rerun, so they must come from the same settings.
    settings = {
        **{k: v for k, v in asdict(cfg).items() if k not in ("out", "max_concurrency")},
        "sae_dir": str(sae_dir.resolve()),
    }
    settings_path = out / "interpret_settings.json"
    if settings_path.is_file() and read_json(settings_path) != json.loads(json.dumps(settings)):
        raise UserError(f"{out} holds features made with other settings; use another --out (or the same settings)")
    write_json(settings_path, settings)

    with torch.no_grad():
        codes = torch.cat([sae.encode(x)[0] for x in dense.flatten(0, 1).split(4096)]).view(*dense.shape[:2], -1)
    alive = torch.nonzero(codes.flatten(0, 1).amax(0) > 0).flatten()
    g = torch.Generator().manual_seed(cfg.seed)
    chosen = alive[torch.randperm(len(alive), generator=g)[: cfg.n_features]].sort().values.tolist()
    n_base = cfg.n_baseline_features or cfg.n_features
    ids = tokens.unique().tolist()
    id_to_str = dict(zip(ids, tokenizer.decode_tokens(ids), strict=True))
    rec_cfg = RecordConfig(window=min(cfg.window, tokens.shape[1]), seed=cfg.seed)
    api = InterpretConfig(
        api_base=cfg.api_base or None,
        api_key_env=cfg.api_key_env,
        explainer_model=cfg.explainer_model,
        simulator_model=cfg.simulator_model,
        max_concurrency=cfg.max_concurrency,
        scorer=cfg.scorer,
        seed=cfg.seed,
    )
    methods: dict[str, tuple[Any, list[int] | None]] = {"sae": (codes.numpy(), chosen)}
    for name in cfg.baselines:
        acts = baseline_activations(dense.numpy(), name, n_features=min(n_base, dense.shape[-1]), seed=cfg.seed)
        methods[name] = (acts, None)
    for name, (acts, feats) in methods.items():
        print(f"{name}: {len(feats) if feats is not None else acts.shape[-1]} features")
        records = build_feature_records(tokens.numpy(), acts, id_to_str, features=feats, cfg=rec_cfg, method=name)
        interpret_features(records, out, name, api)
    extra = {
        "sae_dir": str(sae_dir),
        "model_name": meta.get("model_name"),
        "hook_name": meta.get("hook_name"),
        "n_rows": int(tokens.shape[0]),
        "config": asdict(cfg),
    }
    summary = read_json(write_summary(out, cfg.scorer, extra))
    summary["verdict"] = verdict(summary["by_method"])
    write_json(out / "summary.json", summary)
    write_html(out, summary, cfg.scorer)
    return {"out": out, "summary": summary}


def verdict(by_method: dict[str, Any]) -> str:
    """One honest sentence: do SAE features score above every baseline that was scored?"""
    sae = by_method.get("sae", {}).get("mean_score")
    others = {m: v["mean_score"] for m, v in by_method.items() if m != "sae" and v.get("mean_score") is not None}
    if sae is None or not others:
        return "not enough scored features to compare"
    beaten = [m for m, s in others.items() if s >= sae]
    if not beaten:
        return (
            f"SAE features ({sae:.3f}) score above every baseline ("
            + ", ".join(f"{m} {s:.3f}" for m, s in others.items())
            + ")"
        )
    return f"SAE features ({sae:.3f}) do not score above " + ", ".join(f"{m} ({others[m]:.3f})" for m in beaten)
