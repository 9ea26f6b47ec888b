"""Autointerp of a trained SAE against baselines on the same stored activations: feature records from the
held-out chunks, explanations, simulations and scores through `neuron_explainer`, summary and HTML."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuron_explainer import (
    FeatureRecord,
    InterpretConfig,
    RecordConfig,
    baseline_directions,
    build_feature_records,
    interpret_features,
    project,
    write_html,
    write_summary,
)
from neuron_explainer.baselines import METHODS as BASELINES
from neuron_explainer.client import ClientConfig, resolve_api_key
from neuron_explainer.pipeline import SCORERS
from sparse_coding.activations.store import ActivationDataset
from sparse_coding.config import Config, option
from sparse_coding.data.text import TokenStream, iter_documents
from sparse_coding.errors import UserError
from sparse_coding.eval.heads import head_shares
from sparse_coding.files import read_json, write_json
from sparse_coding.locks import run_folder_lock
from sparse_coding.models.language_model import JOIN, LanguageModel, load_language_model
from sparse_coding.models.paired import PairedModel
from sparse_coding.models.unembed import logit_effects, why_no_logits
from sparse_coding.saes import SAE
from sparse_coding.saes.saelens import load_sae
from sparse_coding.saes.sources import resolve_sae_source
from utils import check_claimable, claim_folder

Effects = Callable[[torch.Tensor], torch.Tensor]  # directions [n, d] → their direct logit effects [n, vocab]


@dataclass
class InterpretRunConfig(Config):
    sae_dir: str = option(
        "", "one SAE: a folder, hf:org/repo[/folder] or a SAELens pretrained release/id; empty: chosen from --run_dir"
    )
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
    runs = [r for r in runs if _single_hook(read_json(r / "results.json"))]
    if not runs:
        raise UserError("no run.py results under outputs/; run `python run.py` first or pass --sae_dir")
    return runs[-1]


def _single_hook(results: dict[str, Any]) -> bool:
    """Whether a run.py results.json is one sweep over stored or streamed activations (not an index of hooks)."""
    return bool(results.get("activations_dir")) or results.get("activations") == "stream"


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


def text_rows(lm: LanguageModel, meta: dict[str, Any], max_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gives (tokens [N, T], activations [N, T, d]) of the first max_rows context rows of the text an SAE was
    trained on (metadata dataset_path, context_size, hook_name), the model run over them as a streamed run.py run
    did; the positions of the tokenizer's special tokens have zero activations, as a store leaves them out."""
    hook = JOIN.join(lm.resolve_hook(h) for h in meta["hook_name"].split(JOIN))  # a CLT's: its layers' inputs
    T = int(meta["context_size"])
    docs = iter_documents(meta["dataset_path"])
    stream = TokenStream(docs, lm.tokenizer.encode_batch, lm.tokenizer.separator()[1], T, name=meta["dataset_path"])
    rows = [r for r in iter(lambda: stream.take(32), None)][: -(-max_rows // 32)]
    if not rows:
        raise UserError(f"{meta['dataset_path']} gives no context row of {T} tokens")
    tokens = torch.cat(rows)[:max_rows]
    excluded = torch.tensor(sorted(lm.tokenizer.excluded_ids("default").values()), dtype=torch.long)
    acts = torch.cat([lm.activations(r, [hook])[hook].float().cpu() for r in tokens.split(32)])
    return tokens, acts * ~torch.isin(tokens, excluded)[..., None]


@dataclass
class FeatureSet:
    """One method's features: activations [N, T, n], the indices to interpret (None: all), and the
    directions [n, d] behind them (an SAE's decoder rows; a baseline's unit directions)."""

    acts: Any
    features: list[int] | None
    directions: torch.Tensor


def run_interpret(cfg: InterpretRunConfig) -> dict[str, Any]:
    """Explains and scores the SAE's features and the baselines'; writes the interpret folder (see
    docs/ARCHITECTURE.md) and gives {"out", "summary"}."""
    if cfg.api_base:  # a missing key is said now, before any work, not after the records are built
        resolve_api_key(ClientConfig(api_base=cfg.api_base, api_key_env=cfg.api_key_env))
    sae_dir = (
        resolve_sae_source(cfg.sae_dir)
        if cfg.sae_dir
        else choose_sae(Path(cfg.run_dir) if cfg.run_dir else newest_run())
    )
    sae, sae_cfg = load_sae(sae_dir)
    meta = sae_cfg.get("metadata", {})
    if not meta.get("model_name") or not (meta.get("activations_dir") or meta.get("dataset_path")):
        raise UserError(f"{sae_dir}'s cfg.json names no model, or no activations or text; was it trained by run.py?")
    lm = load_language_model(meta["model_name"], torch.device("cpu"), diff_model=meta.get("diff_model", ""))
    if meta.get("activations_dir"):
        tokens, dense = load_rows(ActivationDataset.open(meta["activations_dir"]), cfg.max_rows)
    else:  # trained on streamed activations: the text's first rows, the held-out part of such a run
        tokens, dense = text_rows(lm, meta, cfg.max_rows)
    if dense.shape[-1] != sae.d_in:
        raise UserError(f"the stored activations have d={dense.shape[-1]}, the SAE expects d_in={sae.d_in}")
    out = Path(cfg.out) if cfg.out else sae_dir.parent.parent / f"interpret_{sae_dir.name}"
    check_claimable(out, "interpret")
    with run_folder_lock(out):  # one interpret run writes a folder at a time
        prepare_out(cfg, sae_dir, out)
        sets = feature_sets(cfg, sae, dense)
        write_json(out / "sae.json", sae_overview(sae_dir, sets["sae"].acts, dense))
        heads = (int(meta.get("n_heads") or 0), len(meta.get("layers") or []) or 1)
        explain_all(cfg, sets, tokens, lm, direct_logits(lm, sae, meta), out, heads)
        extra = {
            "sae_dir": str(sae_dir),
            "model_name": meta.get("model_name"),
            "hook_name": meta.get("hook_name"),
            "n_rows": int(tokens.shape[0]),
            "config": asdict(cfg),
        }
        summary = read_json(write_summary(out, cfg.scorer, extra))
        write_html(out, summary, cfg.scorer)
    return {"out": out, "summary": summary}


def direct_logits(lm: LanguageModel, sae: SAE, meta: dict[str, Any]) -> tuple[Effects | None, str | None]:
    """The logit lens of the SAE's decoder directions (models/unembed.py), and why there is none where there is
    none. A cross-layer transcoder's feature writes the sum of its decoders into the residual stream (every MLP
    output joins it): that sum is what reaches the logits directly. A crosscoder's is its last layer's block (what
    it writes at the last hook it reconstructs); a model-diffing crosscoder's, its first model's half through that
    model's unembedding."""
    block = -1
    if isinstance(lm, PairedModel):
        lm, meta, block = lm.pair["a"], {"hook_name": meta["hook_name"].split(JOIN)[0].removeprefix("a.")}, 0
    if not sae.cross_layer:
        hook, width = meta.get("hook_name") or "", sae.d_in
    elif sae.layer_transcoder:
        hook, width = (meta.get("hook_name_out") or "").split(JOIN)[0], sae.d_out // sae.n_layers
    else:
        hook, width = (meta.get("hook_name") or "").split(JOIN)[block], sae.d_in // sae.n_layers
    if not hook:
        return None, "the SAE's cfg.json names no hook"
    effects, note = logit_effects(lm, hook, width), why_no_logits(lm, hook, width)
    if effects is None or not sae.cross_layer:
        return effects, note
    per_layer = effects

    def through(directions: torch.Tensor) -> torch.Tensor:
        blocks = directions.reshape(directions.shape[0], sae.n_layers, width)
        return per_layer(blocks.sum(1) if sae.layer_transcoder else blocks[:, block])

    return through, note


def explain_all(
    cfg: InterpretRunConfig,
    sets: dict[str, FeatureSet],
    tokens: torch.Tensor,
    lm: LanguageModel,
    logits: tuple[Effects | None, str | None],
    out: Path,
    heads: tuple[int, int] = (0, 1),
) -> None:
    """Builds every method's feature records (with their dashboard data: logits from the SAE's `direct_logits`;
    at an attn_z hook, heads = (heads per layer, layers), each feature's share per head), then explains, simulates
    and scores them into out/features/."""
    ids = tokens.unique().tolist()
    id_to_str = dict(zip(ids, lm.tokenizer.decode_tokens(ids), strict=True))
    effects, logits_note = logits
    rec_cfg = RecordConfig(window=min(cfg.window, tokens.shape[1]), seed=cfg.seed)
    for name, fs in sets.items():
        print(f"{name}: {len(fs.features) if fs.features is not None else fs.acts.shape[-1]} features")
        records = build_feature_records(tokens.numpy(), fs.acts, id_to_str, features=fs.features, cfg=rec_cfg,
                                        method=name)  # fmt: skip
        add_dashboard(records, fs.directions, effects, lm.tokenizer.decode_tokens, logits_note, heads=heads)
        interpret_features(records, out, name, api_config(cfg))


def sae_overview(sae_dir: Path, codes: Any, dense: torch.Tensor, bins: int = 30) -> dict[str, Any]:
    """The whole SAE on the rows interpreted (sae.json, drawn as sae.html): its latents' log10 firing rates and its
    per-token L0 as histograms, the latents that never fire there, and the run's own metrics for it (results.json
    beside its folder's parent; null with a note for an SAE from elsewhere). Positions a store left out (excluded
    special tokens, all-zero rows) are not counted."""
    kept = (dense.abs().sum(-1) > 0).numpy()
    fired = np.asarray(codes)[kept] > 0  # [tokens, d_sae]
    rate, l0 = fired.mean(0), fired.sum(1)
    live = np.log10(rate[rate > 0])
    rate_counts, rate_edges = np.histogram(live, bins=bins) if live.size else (np.zeros(0), np.zeros(0))
    l0_counts, l0_edges = np.histogram(l0, bins=min(bins, int(l0.max()) + 1)) if l0.size else (np.zeros(0), np.zeros(0))
    results = sae_dir.parent.parent / "results.json"
    runs = read_json(results).get("runs", []) if results.is_file() else []
    row = next((r for r in runs if r.get("name") == sae_dir.name), None)
    return {
        "sae_dir": str(sae_dir),
        "n_latents": int(fired.shape[1]),
        "tokens": int(fired.shape[0]),
        "dead_latents": int((rate == 0).sum()),
        "mean_l0": float(l0.mean()) if l0.size else None,
        "firing_rate_histogram": {"edges": rate_edges.tolist(), "counts": rate_counts.tolist()},
        "l0_histogram": {"edges": l0_edges.tolist(), "counts": l0_counts.tolist()},
        "metrics": {k: v for k, v in row.items() if not isinstance(v, (dict, list))} if row else None,
        "metrics_note": None if row else f"no run results for {sae_dir.name} beside it ({results})",
    }


def prepare_out(cfg: InterpretRunConfig, sae_dir: Path, out: Path) -> None:
    """Claims the output folder, refused when it holds features made with other settings (finished features are
    reused on a rerun, so they must come from the same settings)."""
    claim_folder(out, "interpret")
    settings = {
        **{k: v for k, v in asdict(cfg).items() if k not in ("out", "max_concurrency")},
        "sae_dir": str(sae_dir.resolve()),
    }
    settings_path = out / "interpret_settings.json"
    if settings_path.is_file() and read_json(settings_path) != json.loads(json.dumps(settings)):
        raise UserError(f"{out} holds features made with other settings; use another --out (or the same settings)")
    write_json(settings_path, settings)


def api_config(cfg: InterpretRunConfig) -> InterpretConfig:
    return InterpretConfig(
        api_base=cfg.api_base or None,
        api_key_env=cfg.api_key_env,
        explainer_model=cfg.explainer_model,
        simulator_model=cfg.simulator_model,
        max_concurrency=cfg.max_concurrency,
        scorer=cfg.scorer,
        seed=cfg.seed,
    )


@torch.no_grad()
def feature_sets(cfg: InterpretRunConfig, sae: SAE, dense: torch.Tensor) -> dict[str, FeatureSet]:
    """The SAE's features (a seeded sample of those that fire) and every baseline's, with their directions."""
    codes = torch.cat([sae.encode(x)[0] for x in dense.flatten(0, 1).split(4096)]).view(*dense.shape[:2], -1)
    alive = torch.nonzero(codes.flatten(0, 1).amax(0) > 0).flatten()
    g = torch.Generator().manual_seed(cfg.seed)
    chosen = alive[torch.randperm(len(alive), generator=g)[: cfg.n_features]].sort().values.tolist()
    sets = {"sae": FeatureSet(codes.numpy(), chosen, sae.decoder()[0].detach())}
    n_base = min(cfg.n_baseline_features or cfg.n_features, dense.shape[-1])
    for name in cfg.baselines:
        directions, centre = baseline_directions(dense.numpy(), name, n_features=n_base, seed=cfg.seed)
        sets[name] = FeatureSet(project(dense.numpy(), directions, centre), None, torch.from_numpy(directions))
    return sets


def add_dashboard(
    records: list[FeatureRecord],
    directions: torch.Tensor,
    effects: Callable[[torch.Tensor], torch.Tensor] | None,
    decode: Callable[[list[int]], list[str]],
    logits_note: str | None = None,
    n_neighbours: int = 5,
    n_tokens: int = 10,
    heads: tuple[int, int] = (0, 1),
) -> None:
    """Adds to each record's extras its nearest features by direction cosine, where the path to the logits is
    known the tokens its direction promotes and suppresses most (models/unembed.py), else why not, and with
    heads = (n_heads, layers) its direction's share per attention head (eval/heads.py)."""
    if not records:
        return
    idx = torch.tensor([r.feature_index for r in records])
    unit = directions.float() / directions.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sims = unit[idx] @ unit.T
    sims[torch.arange(len(idx)), idx] = float("-inf")
    near_cos, near_idx = sims.topk(min(n_neighbours, max(unit.shape[0] - 1, 1)), dim=1)
    logits = effects(directions[idx]) if effects is not None else None
    shares = head_shares(directions[idx], *heads) if heads[0] else None
    for i, record in enumerate(records):
        if shares is not None:
            record.extras["head_shares"] = [round(float(v), 4) for v in shares[i]]
        record.extras["neighbours"] = [
            {"index": int(j), "cosine": round(float(c), 4)} for j, c in zip(near_idx[i], near_cos[i], strict=True)
        ]
        if logits is None:
            record.extras["logits_note"] = logits_note or "no path from this hook to the logits"
        else:
            record.extras["logits"] = {
                "promoted": _top_tokens(logits[i], n_tokens, decode),
                "suppressed": _top_tokens(-logits[i], n_tokens, decode, sign=-1.0),
            }


def _top_tokens(values: torch.Tensor, n: int, decode: Callable[[list[int]], list[str]], sign: float = 1.0) -> list:
    """The n largest entries of values [vocab] as [token, sign · value] pairs."""
    top = values.topk(n)
    return [[t, round(sign * float(v), 4)] for t, v in zip(decode(top.indices.tolist()), top.values, strict=True)]
