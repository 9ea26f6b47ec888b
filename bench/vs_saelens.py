"""Our SAEs against SAELens' on the same activations, tokens and evaluation.

For each architecture, our SAE and SAELens' SAE of the same size and knob train on the same batches (the same
ChunkSource order over one stored activation set: the tiny model's MLP neurons at layer 1, cached here if
missing; a toy set with known features if the tiny model is not there). SAELens trains through its own
SAETrainer twice: with its recommended defaults (its learning rate 3e-4, decoder_init_norm 0.1, gradient
clipping, ...) and at our learning rate (the fair match). Every SAE is then saved as a SAELens folder and read
back with `sae_lens.SAE.load_from_disk`, so one evaluation (the same code, SAELens' own inference forms) scores all
on the held-out chunk: FVU, L0 and dead latents (never fired there). tokens_per_s is each training loop's own
rate, batches included, measured in this process.

relu has no k to fix L0, so ours is trained at l1 values bracketing SAELens' l1_coefficient (mapped by
l1_alpha = l1_coefficient · d_sae / d_in, which makes ours SAELens' loss divided by d_in; BRACKET below) and
our FVU is interpolated, in log L0, at each SAELens run's L0 ("l0" then is that L0, "interpolated": true; outside our
runs' L0 range fvu is null, with the reason); our tokens_per_s is then one SAE trained alone on the same tokens, at
the bracket's coefficient whose L0 is nearest that SAELens run's (a relu step turns sparse once training has made
the codes sparse, so both the L0 and the length of the timing run set the rate).

Ours runs through run.py's training loop at its defaults (relu's are SAELens' standard SAE plus our dead-latent
resampling: saes/relu.py; resampling draws its scoring batches from the training stream, so ours' later batches are
other batches of the same chunks than SAELens', the same count trained on).

Prints one JSON line per pair: {"arch", "knob", "d_sae", "tokens", "saelens_setting", "lr",
"ours": {"tokens_per_s", "fvu", "l0", "dead"}, "saelens": {same keys}}.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sparse_coding.activations.batches import ChunkSource  # noqa: E402
from sparse_coding.activations.caching import (  # noqa: E402
    CacheConfig,
    prepare_activations,
    resolve_targets,
    store_specs,
)
from sparse_coding.activations.store import ActivationDataset  # noqa: E402
from sparse_coding.data.toy import ToyDataConfig, ToyGenerator  # noqa: E402
from sparse_coding.models.language_model import load_language_model  # noqa: E402
from sparse_coding.pipelines.lm import RunConfig  # noqa: E402
from sparse_coding.saes import SAES, sae_class  # noqa: E402
from sparse_coding.saes.base import PenaltySAE  # noqa: E402
from sparse_coding.saes.saelens import save_sae  # noqa: E402
from sparse_coding.training.schedule import Schedule  # noqa: E402
from sparse_coding.training.trainer import Trainer, train  # noqa: E402
from utils import tune_allocator  # noqa: E402

SAELENS_DEFAULT_LR = 3e-4  # SAETrainerConfig's and LanguageModelSAERunnerConfig's default
# Our penalty coefficients (relu, gated, jumprelu), as multiples of the one whose loss equals SAELens' (relu: the
# same SAE then, so 1x gives SAELens' L0 at the same lr; tiny model, 1 M tokens, l1_coefficient 1: SAELens' L0 is 111
# at lr 3e-4 and 21.6 at 2e-3, ours at lr 2e-3 21.4 at 1x). Steps of 2 keep the log-L0 chord that interpolates ours
# short (FVU is convex in log L0, so a long chord overstates our FVU).
BRACKET = [1 / 8, 1 / 4, 1 / 2, 1, 2]
# --- data --------------------------------------------------------------------------------------------------


def activation_store(args: argparse.Namespace) -> ActivationDataset | None:
    """The tiny model's activations, enough chunks for --tokens plus one held out (cached here if missing)."""
    if not Path(args.model_name).is_dir():
        return None
    chunk = args.chunk_tokens
    cfg = CacheConfig(
        model_name=args.model_name,
        dataset_name=args.dataset_name,
        max_length=args.max_length,
        n_chunks=math.ceil(args.tokens / chunk) + 1,
        chunk_size_tokens=chunk,
        activations_dir=args.activations_dir,
    )
    lm = load_language_model(cfg.model_name, torch.device("cpu"))
    [data] = prepare_activations(cfg, lm, store_specs(cfg, lm, resolve_targets(cfg, lm)), progress=False)
    return data


class ToyChunks:
    """Stands in for the store when the tiny model is missing: toy activations, d 512, 4096 true features."""

    def __init__(self, seed: int):
        self.cfg = ToyDataConfig(activation_dim=512, n_ground_truth=4096, mean_active=32.0, feature_decay=0.999)
        self.seed = seed
        self.d = 512

    def batches(self, batch: int) -> Iterator[Tensor]:
        gen = ToyGenerator(self.cfg, seed=0, sample_seed=self.seed)
        while True:
            yield gen.sample(batch)[0]

    def held_out(self, n: int) -> Tensor:
        return ToyGenerator(self.cfg, seed=0, sample_seed=10**6).sample(n)[0]


def batch_stream(data: ActivationDataset | ToyChunks, batch: int, seed: int) -> Iterator[Tensor]:
    """The same batches in the same order for every SAE trained (a fresh stream per call)."""
    if isinstance(data, ToyChunks):
        yield from data.batches(batch)
        return
    source = ChunkSource(data, list(range(data.n_chunks - 1)), seed, torch.device("cpu"), mix_chunks=2)
    while True:
        yield source.next_batch(batch)


class StreamSource:
    """batch_stream as our trainer's batch source (every batch is the stream's size; nothing to checkpoint)."""

    def __init__(self, stream: Iterator[Tensor]):
        self.stream = stream

    def next_batch(self, batch_size: int) -> Tensor:
        return next(self.stream)

    def get_state(self) -> dict[str, Tensor]:
        return {}

    def set_state(self, state: dict[str, Tensor]) -> None:
        pass


def held_out(data: ActivationDataset | ToyChunks) -> Tensor:
    return (
        data.held_out(131_072)
        if isinstance(data, ToyChunks)
        else data.load_chunk(data.n_chunks - 1).activations.float()
    )


# --- training ----------------------------------------------------------------------------------------------


def train_ours(
    arch: str, knobs: list[float], d: int, args: argparse.Namespace, data: Any, folder: Path, steps: int
) -> tuple[list[Path], float]:
    """Trains our stack of one SAE per knob value (run.py's defaults) for `steps`
    steps through run.py's training loop; gives their saved folders and the loop's tokens/s."""
    cfg = RunConfig(arch=arch, lr=args.lr, batch_size=args.batch, n_steps=steps, device="cpu")
    cls = sae_class(arch)
    torch.manual_seed(args.seed)
    stack = cls(d, args.d_sae, [{cls.knob: v} for v in knobs], **cfg.sae_options())
    trainer = Trainer([stack], lr=args.lr, schedule=Schedule.from_config(cfg), grad_clip=cfg.grad_clip)
    source = StreamSource(batch_stream(data, args.batch, args.seed))
    start = time.perf_counter()
    train(trainer, source, cfg, None, "", progress=False)
    rate = steps * args.batch / (time.perf_counter() - start)
    meta = {"model_name": args.model_name, "hook_name": "bench", "lr": args.lr, "n_steps": steps}
    paths = [save_sae(folder / f"ours_{arch}_{m}", stack, m, meta) for m in range(stack.n_models)]
    return paths, rate


def train_saelens(
    arch: str, knob: float, d: int, lr: float, args: argparse.Namespace, data: Any, folder: Path
) -> tuple[Path, float]:
    """Trains SAELens' SAE through its SAETrainer (its defaults, at lr) on the same batches; saves its inference
    form; gives the folder and tokens/s."""
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    cls = sae_class(arch)
    module, name = cls.saelens_trainer.rsplit(".", 1)  # type: ignore[union-attr]
    mod = importlib.import_module(f"sae_lens.saes.{module}")
    fields = cls.saelens_trainer_fields(knob, args.d_sae)
    sae = getattr(mod, name)(getattr(mod, name + "Config")(d_in=d, d_sae=args.d_sae, **fields))
    steps = args.tokens // args.batch
    trainer_cfg = SAETrainerConfig(  # lr_end as LanguageModelSAERunnerConfig sets it (unused: constant lr)
        total_training_samples=steps * args.batch, train_batch_size_samples=args.batch, lr=lr, lr_end=lr / 10
    )
    trainer = SAETrainer(trainer_cfg, sae, batch_stream(data, args.batch, args.seed))
    start = time.perf_counter()
    trainer.fit()
    rate = steps * args.batch / (time.perf_counter() - start)
    path = folder / f"saelens_{arch}_{lr:g}"
    sae.save_inference_model(path)
    return path, rate


# --- one evaluation for all --------------------------------------------------------------------------------


@torch.no_grad()
def score(folder: Path, x: Tensor) -> dict[str, float]:
    """FVU, mean L0 and dead latents (never fired) on held-out x [N, d], through SAELens' loader and forms."""
    from sae_lens import SAE

    sae = SAE.load_from_disk(str(folder))
    sq_err, l0, fired = 0.0, 0.0, None
    for xb in x.split(4096):
        codes = sae.encode(xb)
        sq_err += float((sae.decode(codes) - xb).double().pow(2).sum())
        l0 += float((codes != 0).sum())
        fired = (codes != 0).any(0) if fired is None else fired | (codes != 0).any(0)
    total = float((x.double() - x.double().mean(0)).pow(2).sum())
    return {"fvu": sq_err / total, "l0": l0 / x.shape[0], "dead": int((~fired).sum())}


def interpolate_at_l0(points: list[dict[str, float]], l0: float) -> dict[str, Any]:
    """Our FVU at L0 l0, linear in log L0 between the two bracketing runs; dead latents from the run whose L0 is
    nearest. Outside our runs' L0 range there is nothing to interpolate: fvu is None, with the reason."""
    pts = sorted((p for p in points if p["l0"] > 0), key=lambda p: p["l0"])  # (an SAE that never fires: no log)
    if not pts or not pts[0]["l0"] <= l0 <= pts[-1]["l0"]:
        return {
            "fvu": None,
            "l0": l0,
            "dead": None,
            "interpolated": False,
            "reason": f"SAELens' L0 {l0:.3g} is outside our runs' L0 range "
            + (f"[{pts[0]['l0']:.3g}, {pts[-1]['l0']:.3g}]" if pts else "(none fired)"),
        }
    hi = next(i for i, p in enumerate(pts) if p["l0"] >= l0)  # l0 is in range, so some run reaches it
    a, b = pts[max(0, hi - 1)], pts[hi]
    span = math.log(b["l0"]) - math.log(a["l0"])
    t = (math.log(l0) - math.log(a["l0"])) / span if span > 0 else 0.0
    nearest = min(pts, key=lambda p: abs(math.log(p["l0"] / l0)))
    return {
        "fvu": a["fvu"] + t * (b["fvu"] - a["fvu"]),
        "l0": l0,
        "dead": nearest["dead"],
        "interpolated": True,
        "bracket_l0": [a["l0"], b["l0"]],
    }


def earlier_saelens_runs(path: str) -> dict[tuple[Any, ...], dict[str, Any]]:
    """SAELens' results in an earlier run's output (its JSON lines), by (arch, knob, d_sae, tokens, lr): the slow
    half of the bench, which no change of ours alters (same data, batches and seed)."""
    runs = {}
    for line in Path(path).read_text().splitlines() if path else []:
        if line.startswith("{"):
            row = json.loads(line)
            [knob] = row["knob"].values()
            runs[(row["arch"], knob, row["d_sae"], row["tokens"], row["lr"]["saelens"])] = row["saelens"]
    return runs


def compare(arch: str, knob: float, d: int, args: argparse.Namespace, data: Any, x_eval: Tensor, folder: Path) -> None:
    """Trains and scores one architecture's pairs; prints a JSON line per SAELens setting."""
    steps = args.tokens // args.batch
    runs = {}
    for setting, lr in (("default_lr", SAELENS_DEFAULT_LR), ("our_lr", args.lr)):
        key = (arch, knob, args.d_sae, steps * args.batch, lr)
        if key in args.earlier:
            runs[setting] = (lr, args.earlier[key])
            continue
        path, rate = train_saelens(arch, knob, d, lr, args, data, folder)
        runs[setting] = (lr, {"tokens_per_s": round(rate), **score(path, x_eval)})
    penalty = sae_class(arch).knob != "k"
    if penalty:  # our coefficient for the same loss, and a bracket around it
        coefs = [knob * args.d_sae / d * f for f in BRACKET]
        paths, _ = train_ours(arch, coefs, d, args, data, folder, steps)
        points = [score(p, x_eval) for p in paths]
        rates: dict[float, float] = {}  # the timing run per coefficient
    else:
        paths, rate = train_ours(arch, [knob], d, args, data, folder, steps)
        ours = score(paths[0], x_eval)
    for setting, (lr, theirs) in runs.items():
        if penalty:
            mine = interpolate_at_l0(points, theirs["l0"])
            # Timed at the bracket's coefficient nearest SAELens' L0: a sparser SAE steps faster once sparse.
            gap = [abs(math.log(max(pt["l0"], 1e-9) / max(theirs["l0"], 1e-9))) for pt in points]
            coef = coefs[gap.index(min(gap))]
            if coef not in rates:
                timing = folder / f"timing_{coef:g}"
                rates[coef] = train_ours(arch, [coef], d, args, data, timing, args.timing_steps or steps)[1]
            rate = rates[coef]
        else:
            mine = dict(ours)
        row = {
            "arch": arch,
            "knob": {"l1_coefficient" if penalty else "k": knob},
            "d_sae": args.d_sae,
            "tokens": steps * args.batch,
            "saelens_setting": setting,
            "lr": {"ours": args.lr, "saelens": lr},
            "ours": {"tokens_per_s": round(rate), **mine},
            "saelens": theirs,
        }
        print(json.dumps(row), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    trained = sorted(a for a, cls in SAES.items() if cls.saelens_trainer)  # what SAELens has a trainer for
    p.add_argument("--archs", nargs="+", default=["topk", "batchtopk", "relu"], choices=trained)
    p.add_argument("--k", type=int, default=32, help="k of the TopK family")
    p.add_argument(
        "--l1_coefficient", type=float, default=1.0, help="SAELens' l1 (relu, gated) / l0 coefficient (its default)"
    )
    p.add_argument("--d_sae", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=2_000_000, help="training tokens per SAE")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--lr", type=float, default=RunConfig().lr, help="our learning rate (run.py's default)")
    p.add_argument(
        "--timing_steps", type=int, default=0, help="penalty architectures: steps of the single-SAE timing run (0: all)"
    )
    p.add_argument("--model_name", default="checkpoints/tiny", help="a nanoGPT checkpoint folder (else toy data)")
    p.add_argument("--dataset_name", default=CacheConfig().dataset_name, help="the text the activations come from")
    p.add_argument("--max_length", type=int, default=CacheConfig().max_length, help="tokens per context row")
    p.add_argument("--chunk_tokens", type=int, default=131_072, help="tokens per stored chunk (one is held out)")
    p.add_argument("--activations_dir", default="", help="where the store goes (default: under data/activations)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="where the SAE folders go (default: a temporary folder)")
    p.add_argument(
        "--reuse_saelens",
        default="",
        help="an earlier run's output: its SAELens results at the same settings are "
        "taken from there instead of trained again",
    )
    a = p.parse_args()
    a.earlier = earlier_saelens_runs(a.reuse_saelens)
    tune_allocator()
    torch.manual_seed(a.seed)
    data: Any = activation_store(a) or ToyChunks(a.seed)
    x_eval = held_out(data)
    d = x_eval.shape[1]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(a.out or tmp)
        for arch in a.archs:
            knob = a.l1_coefficient if issubclass(sae_class(arch), PenaltySAE) else a.k
            compare(arch, knob, d, a, data, x_eval, folder)


if __name__ == "__main__":
    main()
