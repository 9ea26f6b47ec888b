"""evaluate.py: score SAE folders in the SAELens layout — ours, SAELens' or anyone's — and write eval.json.

`run_evaluate` reads as the table of contents: find the SAE folders (one, or every SAE of a run folder), then
either steer one of them, or score them: on toy data against the ground truth of the run that trained them, or
on a language model's activations (held-out chunks of a stored activation set, or held-out text) with
SAEBench's core metrics and sparse probing; then the figures.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sparse_coding.activations.store import ActivationDataset
from sparse_coding.config import Config, option
from sparse_coding.data.text import TokenStream, iter_documents
from sparse_coding.errors import ConfigError, SAEFolderError, StoreError, UserError
from sparse_coding.eval import probing
from sparse_coding.eval.comparison import write_comparison
from sparse_coding.eval.core import core_metrics, weight_metrics
from sparse_coding.eval.plots import lines
from sparse_coding.eval.reconstruction import ce_and_kl, evaluate, truth_meters
from sparse_coding.eval.steering import MODES, next_token_table, parse_edits, steer
from sparse_coding.files import read_json, write_json
from sparse_coding.models.language_model import JOIN, LanguageModel, load_language_model
from sparse_coding.saes import SAE
from sparse_coding.saes.saelens import CFG_FILE, load_sae
from sparse_coding.saes.sources import resolve_sae_source
from utils import resolve_device

EVAL_FILE = "eval.json"


@dataclass
class EvaluateConfig(Config):
    sae_dir: str = option(
        "",
        "an SAE folder (SAELens layout), a run.py / replicate_toy_models.py run folder, hf:org/repo[/folder] (the "
        "Hugging Face hub) or a SAELens pretrained release/id",
    )
    out: str = option("", "folder for eval.json and the figures; empty: outputs/<timestamp>_eval/")
    model_name: str = option("", "the model; empty: the SAE's cfg.json metadata.model_name")
    hook_name: str = option("", "the hook; empty: metadata.hook_name")
    dataset_name: str = option(
        "",
        "held-out text: hub name or local .jsonl/.json/.txt/.parquet file or folder; empty: the held-out chunks of "
        "the stored activations the SAE was trained on (metadata.activations_dir), else metadata.dataset_path",
    )
    activations_dir: str = option("", "a stored activation set to score on (its last n_eval_chunks chunks)")
    text_field: str = option("text", "the field of each record that holds its text")
    dataset_split: str = option("train", "the split of a hub dataset")
    context_size: int = option(0, "tokens per row of text; 0: metadata.context_size (else 128)", ge=0)
    n_eval_chunks: int = option(1, "stored activations: the last chunks (run.py holds out its last one)", gt=0)
    eval_tokens: int = option(32_768, "tokens of text scored (stored activations: all of the chunks)", gt=0)
    ce_eval_rows: int = option(32, "rows for CE/KL through the model (0: skip)", ge=0)
    exclude_special_tokens: bool = option(
        True, "leave BOS/EOS/PAD tokens out of every metric, keeping their own activation (as SAELens' run_evals)"
    )
    batch_size: int = option(4096, "activations per SAE batch", gt=0)
    model_batch_size: int = option(16, "rows per forward pass when computing activations from text", gt=0)
    probe: bool = option(True, "sparse probing on labels the text provides (code block, doctest, keyword, literal)")
    probe_k: list[int] = option([1, 2, 5, 10, 20, 50], "k of the k-sparse probes", gt=0)
    probe_examples: int = option(1500, "tokens of each class per probing task (fewer where the text has fewer)", gt=0)
    n_eval: int = option(0, "toy runs: held-out examples scored; 0: the run's own held-out set (its n_eval)", ge=0)
    mmcs_threshold: float = option(0.9, "toy runs: a true feature counts as found above this cosine", gt=0, lt=1)
    steer: str = option("", "LATENT=VALUE[,LATENT=VALUE...]: print --prompt's next-token distribution before/after")
    steer_mode: str = option("add", "how --steer edits its latents", choices=MODES)
    prompt: str = option("", "the text whose next token --steer shows")
    top_tokens: int = option(10, "next tokens shown by --steer", gt=0)
    device: str = option("auto", "auto (CUDA when present), cpu, cuda or cuda:N")
    seed: int = option(0, "random seed of the probing splits")

    def check(self) -> None:
        super().check()
        if self.steer and not self.prompt:
            raise ConfigError("--steer needs --prompt TEXT")


@dataclass
class EvalData:
    """What the SAEs are scored on: token rows [R, T], which positions have an activation (kept [R, T]; a store
    leaves out the special tokens it excludes) and those activations at the hook [n_kept, d], row-major."""

    tokens: Tensor
    kept: Tensor
    acts: Tensor
    source: dict[str, Any]
    targets: Tensor | None = None  # a transcoder's: the module's output at the same positions [n_kept, d_out]

    def rows(self) -> Tensor:
        """The rows the SAEs are scored on, as they train on them: activations, with a transcoder's targets beside."""
        return self.acts if self.targets is None else torch.cat([self.acts, self.targets], dim=-1)

    def rows_of(self, positions: Tensor) -> Tensor:
        """Gives the activation row of each kept flat position in [R·T] (positions must be kept)."""
        row = torch.full((self.kept.numel(),), -1, dtype=torch.long)
        row[self.kept.flatten()] = torch.arange(int(self.kept.sum()))
        return row[positions]


def sae_folders(path: Path) -> list[Path]:
    """The SAE folder itself, or every SAE folder under a run folder's saes/ (and its sub-runs')."""
    if (path / CFG_FILE).is_file():
        return [path]
    found = sorted(p.parent for p in path.glob("saes/*/" + CFG_FILE)) + sorted(
        p.parent for p in path.glob("*/saes/*/" + CFG_FILE)
    )
    if not found:
        raise SAEFolderError(f"{path} is neither an SAE folder ({CFG_FILE}) nor a run folder with saes/")
    return found


def run_evaluate(cfg: EvaluateConfig, out_dir: Path, lm: LanguageModel | None = None) -> dict[str, Any]:
    """Scores the SAEs at cfg.sae_dir and writes out_dir/eval.json and the figures; gives eval.json's content.
    `lm` replaces loading the model by name (for models built in memory, e.g. in tests)."""
    if not cfg.sae_dir:
        raise ConfigError("--sae_dir is required: an SAE folder or a run folder")
    folders = sae_folders(resolve_sae_source(cfg.sae_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = read_json(folders[0] / CFG_FILE).get("metadata") or {}
    device = resolve_device(cfg.device)
    if cfg.steer:
        return run_steering(cfg, folders, meta, out_dir, device, lm)
    if meta.get("model_name") == "toy" and not cfg.model_name:
        result = evaluate_toy(cfg, folders, device)
    else:
        result = evaluate_lm_groups(cfg, folders, device, lm)
    write_json(out_dir / EVAL_FILE, result)
    plot_eval(result, out_dir)
    return result


def load_model_and_hook(
    cfg: EvaluateConfig, meta: dict[str, Any], device: torch.device, lm: LanguageModel | None
) -> tuple[LanguageModel, str, str | None]:
    """Gives the model, the hook the SAEs read and the hook a transcoder replaces (None for SAEs), by canonical names
    (hooks joined with '+' for a cross-layer transcoder)."""
    name, hook = cfg.model_name or meta.get("model_name"), cfg.hook_name or meta.get("hook_name")
    if lm is None:
        if not name:
            raise ConfigError("the SAE's cfg.json names no model; pass --model_name")
        lm = load_language_model(name, device, diff_model="" if cfg.model_name else meta.get("diff_model", ""))
    if not hook:
        raise ConfigError("the SAE's cfg.json names no hook; pass --hook_name")
    out = None if cfg.hook_name else meta.get("hook_name_out")
    canonical = lm.resolve_hook

    def resolve(h: str) -> str:
        return JOIN.join(canonical(part) for part in h.split(JOIN))

    return lm, resolve(hook), resolve(out) if out else None


def eval_data(
    cfg: EvaluateConfig, meta: dict[str, Any], lm: LanguageModel, hook: str, target_hook: str | None = None
) -> EvalData:
    """The held-out tokens and activations (and a transcoder's targets): a stored set's last chunks, or text run
    through the model."""
    store = cfg.activations_dir or ("" if cfg.dataset_name else meta.get("activations_dir", ""))
    if store and (Path(store) / "manifest.json").is_file():
        data = ActivationDataset.open(store)
        for key, want in (("hook_name", hook), ("target_hook", target_hook)):
            if data.manifest.get(key) != want:
                raise StoreError(f"{store} holds activations of {data.manifest.get(key)!r}, not {want!r} ({key})")
        first = max(0, data.n_chunks - cfg.n_eval_chunks)
        parts = [data.load_chunk(i) for i in range(first, data.n_chunks)]
        if any(c.tokens is None or c.kept is None or c.tokens.dim() != 2 for c in parts):
            raise StoreError(f"{store} holds no token rows (your own files): pass --dataset_name to score on text")
        tokens, kept = torch.cat([c.tokens for c in parts]).long(), torch.cat([c.kept for c in parts])  # type: ignore[misc]
        acts = torch.cat([c.activations for c in parts]).float()
        targets = torch.cat([c.targets for c in parts]).float() if target_hook else None  # type: ignore[misc]
        source = {"kind": "activations", "path": str(store), "chunks": [first, data.n_chunks]}
        return EvalData(tokens, kept, acts, source, targets)
    dataset = cfg.dataset_name or meta.get("dataset_path")
    if not dataset:
        raise ConfigError("nothing to score on: pass --dataset_name (held-out text) or --activations_dir")
    T = cfg.context_size or int(meta.get("context_size") or 128)
    docs = iter_documents(dataset, cfg.text_field, cfg.dataset_split)
    stream = TokenStream(docs, lm.tokenizer.encode_batch, lm.tokenizer.separator()[1], T, name=dataset)
    hooks = [hook] + ([target_hook] if target_hook else [])
    batches, acts, wanted = [], [], -(-cfg.eval_tokens // T)
    while wanted > 0 and (rows := stream.take(min(cfg.model_batch_size, wanted))) is not None:
        batches.append(rows)
        values = lm.activations(rows, hooks)
        acts.append([values[h].float().cpu().flatten(0, 1) for h in hooks])
        wanted -= len(rows)
    if not batches:
        raise ConfigError(f"{dataset} holds fewer than {T} tokens: nothing to score")
    tokens = torch.cat(batches)
    source = {"kind": "text", "path": dataset, "rows": len(tokens)}
    inputs, *outputs = (torch.cat(parts) for parts in zip(*acts, strict=True))
    return EvalData(tokens, torch.ones_like(tokens, dtype=torch.bool), inputs, source, outputs[0] if outputs else None)


def evaluate_lm_groups(
    cfg: EvaluateConfig, folders: list[Path], device: torch.device, lm: LanguageModel | None
) -> dict[str, Any]:
    """SAEs of one model at one hook are scored together on one set of activations; a run folder holding SAEs
    of several hooks (or models) gets one such group each: "groups" lists them and "saes" holds every SAE."""
    groups: dict[tuple[str, str], list[Path]] = {}
    for folder in folders:
        meta = read_json(folder / CFG_FILE).get("metadata") or {}
        key = (cfg.model_name or meta.get("model_name", ""), cfg.hook_name or meta.get("hook_name", ""))
        groups.setdefault(key, []).append(folder)
    results = []
    for group in groups.values():
        meta = read_json(group[0] / CFG_FILE).get("metadata") or {}
        results.append(evaluate_lm(cfg, group, meta, device, lm))
    if len(results) == 1:
        return results[0]
    return {"config": asdict(cfg), "groups": results, "saes": {k: v for r in results for k, v in r["saes"].items()}}


def evaluate_lm(
    cfg: EvaluateConfig, folders: list[Path], meta: dict[str, Any], device: torch.device, lm: LanguageModel | None
) -> dict[str, Any]:
    """Core metrics (and probing) of every SAE on one model's activations at one hook."""
    lm, hook, target_hook = load_model_and_hook(cfg, meta, device, lm)
    data = eval_data(cfg, meta, lm, hook, target_hook)
    special = lm.tokenizer.special_ids if cfg.exclude_special_tokens else ()
    keep = data.kept & ~torch.isin(data.tokens, torch.tensor(special, dtype=torch.long))  # [R, T]
    x_eval = data.rows()[keep[data.kept]].to(device)
    excluded = sorted(set(special) | set(data.tokens[~data.kept].tolist()))  # also what the store left out
    ce_rows = data.tokens[: cfg.ce_eval_rows]
    probe = ProbeSet.build(cfg, lm, data, keep) if cfg.probe else None
    saes: dict[str, Any] = {}
    for folder in folders:
        sae, sae_cfg = load_sae(folder, device)
        if sae.d_in != data.acts.shape[-1]:
            raise UserError(f"{folder} expects d_in={sae.d_in}; the activations at {hook} have {data.acts.shape[-1]}")
        stats = evaluate([sae], x_eval, cfg.batch_size)[0]
        scored = lm.head is not None and len(ce_rows) > 0
        through = ce_and_kl(lm, target_hook or hook, sae, ce_rows, excluded, target_hook and hook) if scored else None
        saes[folder.name] = {
            **sae_summary(folder, sae, sae_cfg),
            "hook_name": hook,
            "metrics": core_metrics(stats, 0, weight_metrics(sae, 0), through, (ce_rows.numel(), data.tokens.numel())),
            **({"probing": probe.score(sae)} if probe else {}),
        }
    return {
        "model_name": lm.name,
        "hook_name": hook,
        "data": {**data.source, "tokens_scored": int(keep.sum()), "special_tokens_excluded": list(special)},
        "config": asdict(cfg),
        "saes": saes,
        **({"probing_baselines": probe.baselines} if probe else {}),
    }


def sae_summary(folder: Path, sae: SAE, sae_cfg: dict[str, Any]) -> dict[str, Any]:
    """Which SAE a result belongs to: its folder, architecture, knob and size."""
    return {
        "sae_dir": str(folder),
        "arch": sae.architecture,
        "knob": sae.knob,
        **sae.hparams(0),
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "saelens_architecture": sae_cfg.get("architecture"),
    }


class ProbeSet:
    """The probing tokens chosen once (balanced per task), their activations, and the baselines' accuracies;
    `score` adds one SAE's."""

    def __init__(self, cfg: EvaluateConfig, acts: Tensor, tasks: dict[str, Any]):
        self.cfg, self.acts, self.tasks = cfg, acts, tasks
        x = acts.numpy()
        self.baselines = probing.probe_tasks({"neurons": x}, tasks, cfg.probe_k, dense=x)

    @classmethod
    def build(cls, cfg: EvaluateConfig, lm: LanguageModel, data: EvalData, keep: Tensor) -> ProbeSet | None:
        ids = data.tokens.unique().tolist()
        vocab = dict(zip(ids, lm.tokenizer.decode_tokens(ids), strict=True))
        strs = [[vocab[i] for i in row] for row in data.tokens.tolist()]
        labels = probing.corpus_labels(strs)
        for lab in labels.values():  # special tokens are never probed
            lab.reshape(-1)[~keep.flatten().numpy()] = -1
        tokens, tasks = probing.probe_set(labels, cfg.probe_examples, cfg.seed)
        if not tasks:
            return None
        return cls(cfg, data.acts[data.rows_of(torch.from_numpy(tokens))], tasks)

    @torch.no_grad()
    def score(self, sae: SAE) -> dict[str, Any]:
        codes = sae.encode(self.acts.to(sae.b_dec.device))[0].cpu().numpy()
        return probing.probe_tasks({"sae": codes}, self.tasks, self.cfg.probe_k)


def evaluate_toy(cfg: EvaluateConfig, folders: list[Path], device: torch.device) -> dict[str, Any]:
    """Toy SAEs against the ground truth of the run that trained them, on fresh held-out examples."""
    from sparse_coding.pipelines.toy import toy_eval_set

    saes: dict[str, Any] = {}
    eval_sets: dict[Path, Any] = {}  # one per toy run (a comparison has several)
    for folder in folders:
        run_dir = folder.parent.parent
        if not (run_dir / "ground_truth.safetensors").is_file():
            raise UserError(f"{folder} is a toy SAE but {run_dir} holds no ground_truth.safetensors")
        if run_dir not in eval_sets:
            eval_sets[run_dir] = toy_eval_set(read_json(run_dir / "config.json"), device, cfg.n_eval)
        gen, x_eval, true_eval = eval_sets[run_dir]
        sae, sae_cfg = load_sae(folder, device)
        stats = evaluate([sae], x_eval, cfg.batch_size)[0]
        truth = truth_meters([sae], gen.features, gen.parent, x_eval, true_eval, cfg.batch_size)[0]
        saes[folder.name] = {
            **sae_summary(folder, sae, sae_cfg),
            "metrics": core_metrics(stats, 0, weight_metrics(sae, 0), None, (0, len(x_eval))),
            "synthetic": truth.result(0, gen.depth, cfg.mmcs_threshold),
        }
    return {"model_name": "toy", "config": asdict(cfg), "saes": saes}


def run_steering(
    cfg: EvaluateConfig,
    folders: list[Path],
    meta: dict[str, Any],
    out_dir: Path,
    device: torch.device,
    lm: LanguageModel | None,
) -> dict[str, Any]:
    """Prints and writes --prompt's next-token distribution before and after the edit."""
    if len(folders) != 1:
        raise ConfigError("--steer needs one SAE folder, not a run folder")
    lm, hook, target_hook = load_model_and_hook(cfg, meta, device, lm)
    if target_hook:
        raise ConfigError("--steer edits the codes of an SAE at its own hook; transcoders are not steered yet")
    sae, _ = load_sae(folders[0], device)
    edits = parse_edits(cfg.steer, sae.d_sae)
    tokens = torch.tensor([lm.tokenizer.encode_batch([cfg.prompt])[0]], dtype=torch.long)
    if tokens.shape[1] == 0:
        raise ConfigError("--prompt is empty after tokenization")
    before = next_token_table(lm.logits(tokens)[0], lm.tokenizer.decode_tokens, cfg.top_tokens)
    after = next_token_table(
        steer(lm, sae, hook, edits, cfg.steer_mode)(tokens)[0], lm.tokenizer.decode_tokens, cfg.top_tokens
    )
    result = {"sae_dir": str(folders[0]), "hook_name": hook, "prompt": cfg.prompt, "mode": cfg.steer_mode,
              "edits": {str(k): v for k, v in edits.items()}, "before": before, "after": after}  # fmt: skip
    write_json(out_dir / "steer.json", result)
    return result


def plot_eval(result: dict[str, Any], out_dir: Path) -> None:
    """One figure per question: the FVU/L0 frontier per architecture; probing accuracy against k; absorption
    per hierarchy depth (toy runs with a hierarchy)."""
    saes = result["saes"].values()
    frontier: dict[str, tuple[list[float], list[float]]] = {}
    for s in saes:
        xs, ys = frontier.setdefault(s["arch"], ([], []))
        xs.append(s["metrics"]["sparsity"]["l0"])
        ys.append(1 - s["metrics"]["reconstruction_quality"]["explained_variance"])
    lines(frontier, "FVU against L0, one line per architecture", "L0 (active latents per token)",
          "FVU (1 − explained variance)", out_dir / "frontier_fvu_l0.png", log_x=True)  # fmt: skip
    if "probing_baselines" in result:
        plot_probing(result, out_dir / "probing_accuracy_vs_k.png")
    rows = [{**s, **s["synthetic"], "l0": s["metrics"]["sparsity"]["l0"], "dict_size": s["d_sae"],
             "fvu": 1 - s["metrics"]["reconstruction_quality"]["explained_variance"]}
            for s in saes if s.get("synthetic") and s["synthetic"].get("absorption_by_depth")]  # fmt: skip
    if rows:
        write_comparison(rows, out_dir)


def plot_probing(result: dict[str, Any], path: Path) -> None:
    """Mean accuracy over tasks against k: each SAE's latents, the neurons, and the dense probe as a line."""
    series = {}
    base = result["probing_baselines"]["mean"]
    for name, s in result["saes"].items():
        if s.get("probing") and s["probing"]["mean"].get("sae"):
            acc = s["probing"]["mean"]["sae"]
            series[f"SAE {name}"] = ([int(k) for k in acc], list(acc.values()))
    series["neurons"] = ([int(k) for k in base["neurons"]], list(base["neurons"].values()))
    tasks = ", ".join(result["probing_baselines"]["tasks"])
    lines(series, f"k-sparse probing, mean over tasks ({tasks})", "k (features the probe may use)",
          "test accuracy (balanced classes)", path, log_x=True,
          reference={f"dense probe on the activation ({base['dense']:.3f})": base["dense"]})  # fmt: skip
