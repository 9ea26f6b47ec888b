"""Training-step throughput of an SAE stack beside this machine's matmul roofline.

The roofline is the time of the matmuls the architecture's dense step needs (`roofline_matmuls` of its class:
for most, encoder forward, decoder forward, the codes' gradient, decoder and encoder weight gradients, so
10·d_in·d_sae FLOP per token; gated adds its auxiliary path's decoder forward and codes' gradient), each measured
here at the step's own shapes into preallocated outputs. A dense step can at best match it; a sparse (TopK
family) step can beat it. With --n_models > 1 the stack is also compared with one SAE fed the same number of
tokens per step in one large batch. Prints one JSON line per measurement.

The first line describes the machine: the CPU (or GPU) model, whether the CPU has AMX-BF16 / AVX512-BF16 units, and R,
the measured bf16/fp32 ratio of the encoder's matmul at the bench's own shapes (torch.bmm, bf16 against fp32
tensors), so a bf16 figure can be read against what this machine's units allow. Where R < 1.3 (no bf16 units: bf16
would be emulated at fp32 speed at best) the bf16 rows give "no bf16 units" in place of their ratio to fp32.

--train_dtype bf16|fp16 times the step in that precision (saes/precision.py) against a roofline of the same matmuls
really run in that dtype (torch.bmm on bf16/fp16 tensors), so the ratio is against the hardware's limit for the
precision used; on a CPU without bf16/fp16 units that limit is far below fp32's and the step emulates the precision
at about fp32 speed. --compare fp32 also times the fp32 step in the same rounds, its steps taken in turn with the
other precision's, and prints both rates and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sparse_coding.saes import SAES, build_sae, single_hook_archs  # noqa: E402
from sparse_coding.saes.precision import TRAIN_DTYPES, Precision  # noqa: E402
from sparse_coding.training.trainer import Trainer  # noqa: E402
from utils import tune_allocator  # noqa: E402


def timed(fn) -> float:
    """The wall time of one call of fn, queued device work included."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def median_time(fn, repeats: int) -> float:
    fn()
    return statistics.median(timed(fn) for _ in range(repeats))


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


KNOB_DEFAULTS = {"k": 32, "l1_alpha": 1e-3, "l0_coef": 1.0}  # a typical value of each knob
NO_UNITS_BELOW = 1.3  # a bf16/fp32 matmul ratio under this: the machine has no bf16 units worth the name


def machine(M: int, B: int, d: int, f: int, device: torch.device, repeats: int) -> dict:
    """The machine's line: its processor, bf16 units, and R, the bf16/fp32 time ratio of the encoder's matmul
    [M, B, d] × [M, d, f] measured here."""
    if device.type == "cuda":
        name, flags = torch.cuda.get_device_name(device), {}
    else:
        info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
        name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
        flags = {f: f in info.split() for f in ("amx_bf16", "avx512_bf16")}
    x, w = torch.randn(M, B, d, device=device), torch.randn(M, d, f, device=device)
    xb, wb = x.bfloat16(), w.bfloat16()
    # Into preallocated outputs, as the step's encoder writes: a fresh [B, f] output costs a page fault per 4 KiB
    # on a CPU, twice as many for fp32's as for bf16's, which inflated R by ~15 % here.
    out, out_b = torch.empty(M, B, f, device=device), torch.empty(M, B, f, device=device, dtype=torch.bfloat16)
    fp32 = median_time(lambda: torch.bmm(x, w, out=out), repeats)
    bf16 = median_time(lambda: torch.bmm(xb, wb, out=out_b), repeats)
    return {"machine": name, "device": str(device), **flags, "threads": torch.get_num_threads(),
            "R_bf16_over_fp32": round(fp32 / bf16, 2), "gemm": [M, B, d, f]}  # fmt: skip


def roofline_step_seconds(
    names: tuple[str, ...],
    M: int,
    B: int,
    d: int,
    f: int,
    device: torch.device,
    repeats: int,
    dtype: torch.dtype = torch.float32,
) -> float:
    """Gives the summed median times of the named matmuls of one dense step, every tensor in dtype."""
    new = {"device": device, "dtype": dtype}
    x, W_enc, W_dec = (torch.randn(*s, **new) for s in ((M, B, d), (M, d, f), (M, f, d)))
    codes, g_codes, g_xhat = torch.randn(M, B, f, **new), torch.empty(M, B, f, **new), x.clone()
    enc_out, dec_out = torch.empty(M, B, f, **new), torch.empty(M, B, d, **new)
    gW_dec, gW_enc = torch.empty(M, f, d, **new), torch.empty(M, d, f, **new)
    gemms = {
        "encoder": lambda: torch.bmm(x, W_enc, out=enc_out),
        "decoder": lambda: torch.bmm(codes, W_dec, out=dec_out),
        "codes_grad": lambda: torch.bmm(g_xhat, W_dec.mT, out=g_codes),
        "decoder_grad": lambda: torch.bmm(codes.mT, g_xhat, out=gW_dec),
        "encoder_grad": lambda: torch.bmm(x.mT, g_codes, out=gW_enc),
    }
    return sum(median_time(gemms[name], repeats) for name in names)


def stepped_trainer(
    arch: str, M: int, B: int, d: int, f: int, knob: float, device: torch.device, train_dtype: str = "fp32"
) -> tuple[Trainer, torch.Tensor]:
    """A trainer over one stack and a batch for it, one step already taken (lazy buffers allocated)."""
    torch.manual_seed(0)
    sae = build_sae(arch, d, f, [{SAES[arch].knob: knob}] * M).to(device)
    sae.precision = Precision(train_dtype)
    trainer = Trainer([sae], lr=1e-4)  # the architecture's default clip and Adam ε, as training uses them
    x = torch.randn(B, d, device=device)
    trainer.step(x)
    return trainer, x


def step_seconds(
    arch: str,
    M: int,
    B: int,
    d: int,
    f: int,
    knob: float,
    device: torch.device,
    steps: int,
    train_dtype: str = "fp32",
) -> float:
    """Gives the median wall time of the trainer's own training step (forward, backward, gradient constraints and
    clipping, fused Adam) on a stack."""
    trainer, x = stepped_trainer(arch, M, B, d, f, knob, device, train_dtype)
    return median_time(lambda: trainer.step(x), steps)


def paired_step_seconds(
    arch: str, M: int, B: int, d: int, f: int, knob: float, device: torch.device, steps: int, train_dtype: str
) -> tuple[float, float]:
    """Gives the median wall times of the step in train_dtype and in fp32, their steps taken in turn: a drift in
    the machine's speed (seconds long on a shared box) then hits both sides alike, where blocks of steps one after
    the other put it on one side (per-round ratios moved by ±10 % that way)."""
    low, x_low = stepped_trainer(arch, M, B, d, f, knob, device, train_dtype)
    fp32, x_fp32 = stepped_trainer(arch, M, B, d, f, knob, device)
    pairs = [(timed(lambda: low.step(x_low)), timed(lambda: fp32.step(x_fp32))) for _ in range(steps)]
    return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched under it: views (no kernel) apart, and host reads of a tensor's value."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = self.views = self.host_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if func is torch.ops.aten._local_scalar_dense.default:
            self.host_reads += 1
        elif func.is_view:
            self.views += 1
        else:
            self.ops += 1
        return func(*args, **(kwargs or {}))


def dispatch_profile(trainer: Trainer, x: torch.Tensor, step_s: float) -> dict:
    """What one step asks of the host: aten ops other than views (on a GPU each launches at least one kernel, a few
    µs of host time apiece, so a small step can be bound by them rather than by the GPU) and host reads of a
    tensor's value (on a GPU each waits for every kernel queued before it). On CUDA also the step's summed kernel
    time (torch.profiler, one step) over its median wall time step_s: near 1 the GPU is the limit, well below it
    the host is."""
    with _OpCounter() as counter:
        trainer.step(x)
    row: dict = {"ops_per_step": counter.ops, "views_per_step": counter.views}
    row["host_reads_per_step"] = counter.host_reads
    if x.device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        try:  # (not run where this was written, without a GPU: a failure must not cost the row its timings)
            sync()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                trainer.step(x)
                sync()
            kernels_us = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type != DeviceType.CPU)
            row["kernel_ms_per_step"] = round(kernels_us / 1e3, 3)
            row["device_busy"] = round(kernels_us / 1e6 / step_s, 3)
        except Exception as e:
            row["device_busy"], row["device_busy_error"] = None, f"{type(e).__name__}: {e}"[:300]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=sorted(single_hook_archs()), default="relu")
    p.add_argument("--d_in", type=int, default=512)
    p.add_argument("--d_sae", type=int, default=8192)
    for name in sorted({cls.knob for cls in SAES.values()}):
        p.add_argument(f"--{name}", type=float, default=KNOB_DEFAULTS.get(name), help="the knob, for the archs it is")
    p.add_argument("--batch", type=int, default=4096, help="tokens per step, per model")
    p.add_argument("--n_models", type=int, default=1, help="SAEs stacked in lockstep")
    p.add_argument("--steps", type=int, default=7, help="timed steps (the median is kept)")
    p.add_argument("--repeats", type=int, default=7, help="timings per roofline matmul (the median is kept)")
    p.add_argument("--rounds", type=int, default=3, help="alternating step/roofline rounds (medians kept)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--train_dtype", choices=sorted(TRAIN_DTYPES), default="fp32", help="the step's matmul precision")
    p.add_argument("--compare", choices=["fp32"], help="also time the fp32 step in the same rounds")
    a = p.parse_args()
    tune_allocator()
    device = torch.device(a.device)
    M, B, d, f = a.n_models, a.batch, a.d_in, a.d_sae
    knob_name = SAES[a.arch].knob
    knob = getattr(a, knob_name)
    dtype, compare = TRAIN_DTYPES[a.train_dtype], a.compare is not None
    header = machine(M, B, d, f, device, a.repeats)
    print(json.dumps(header), flush=True)
    units = a.train_dtype != "bf16" or header["R_bf16_over_fp32"] >= NO_UNITS_BELOW
    # Rounds alternate step and roofline timings, so drift in the machine's speed hits both alike; with --compare the
    # two precisions' steps alternate step by step.
    rounds = []
    for _ in range(a.rounds):
        if compare:
            t, t_fp32 = paired_step_seconds(a.arch, M, B, d, f, knob, device, a.steps, a.train_dtype)
        else:
            t, t_fp32 = step_seconds(a.arch, M, B, d, f, knob, device, a.steps, a.train_dtype), 0.0
        roof = roofline_step_seconds(SAES[a.arch].roofline_matmuls, M, B, d, f, device, a.repeats, dtype)
        rounds.append((t, roof, t_fp32))
    t_step = statistics.median(r[0] for r in rounds)
    t_roof = statistics.median(r[1] for r in rounds)
    ratio = statistics.median(r[1] / r[0] for r in rounds)
    row = {
        "arch": a.arch,
        "train_dtype": a.train_dtype,
        "matmuls": "native" if Precision(a.train_dtype).is_native(device) else "emulated",
        "d_in": d,
        "d_sae": f,
        knob_name: knob,
        "batch": B,
        "n_models": M,
        "tokens_per_s": round(M * B / t_step),
        "roofline_tokens_per_s": round(M * B / t_roof),
        "ratio": round(ratio, 3) if units else "no bf16 units",
        "roofline_dtype": str(dtype).removeprefix("torch."),
        "roofline_matmuls": len(SAES[a.arch].roofline_matmuls),
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    if compare:
        row["fp32_tokens_per_s"] = round(M * B / statistics.median(r[2] for r in rounds))
        row["ratio_vs_fp32"] = round(statistics.median(r[2] / r[0] for r in rounds), 3) if units else "no bf16 units"
    row.update(dispatch_profile(*stepped_trainer(a.arch, M, B, d, f, knob, device, a.train_dtype), t_step))
    if M > 1:  # the rival: one SAE, same tokens per step in one batch
        pairs = [
            (
                step_seconds(a.arch, 1, M * B, d, f, knob, device, a.steps),
                step_seconds(a.arch, M, B, d, f, knob, device, a.steps),
            )
            for _ in range(a.rounds)
        ]
        row["single_sae_tokens_per_s"] = round(M * B / statistics.median(p[0] for p in pairs))
        row["ratio_vs_single_sae"] = round(statistics.median(p[0] / p[1] for p in pairs), 3)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
