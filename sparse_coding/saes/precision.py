"""Mixed precision (`--train_dtype fp32|bf16|fp16`): how the big matmuls of every architecture run, in one place.

Scheme: master weights, Adam state, decoder normalisation, the loss and every metric sum stay in float32; the big
matmuls (encoder forward, decoder forward, the codes' gradient and both weight gradients) take their operands in
the low precision and give their result in float32. On CUDA they run natively (`out_dtype=float32`: the tensor
cores multiply bf16/fp16 and accumulate in fp32). fp16's range is narrow (normal numbers from 6e-5), and a
mean-squared-error gradient is ~1e-6 per entry, so each fp16 operand is first multiplied by a power of two that
brings its largest magnitude into [0.5, 1) and the product divided by both: exact, and no loss scaling needed.

A CPU without native bf16/fp16 matmuls (no AVX-512 BF16 / AMX, or AVX-512 FP16 / AMX-FP16) runs torch's bf16
matmul far slower than fp32 (~35x on an AVX2 EPYC). There the low precision is EMULATED: the operands are rounded
to bf16/fp16 and multiplied in fp32 — the same rounding of the inputs as a native matmul with fp32
accumulation, so quality figures are honest, but at fp32 speed (plus the rounding passes), never faster.

The TopK family's sparse path (gathers and per-latent sums, O(B·k·d_in), memory bound) has one lowered part: on
CPU its gather kernels read the decoder's rows in bf16 under bf16 (the rounding a dense decoder's operand gets,
half the bytes; sums in fp32; saes/sparse.py). Not lowered: the rest of it (per-latent sums, and everything on
CUDA), a skip transcoder's W_skip path and small bias-gradient products. fp32 is the plain path: no cast, the same
calls as without the option, bit for bit.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

FLOAT = torch.float32
TRAIN_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# /proc/cpuinfo flags of a CPU whose matmul units take the dtype natively
_CPU_FLAGS = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}


@functools.cache
def cpu_has_native(name: str) -> bool:
    """Whether this CPU multiplies `name` ("bf16", "fp16") matrices natively (its /proc/cpuinfo flags; False
    where they cannot be read, e.g. not Linux). torch's cpu capability ("AVX512") does not tell bf16 units apart."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}
    return any(f in flags for f in _CPU_FLAGS.get(name, ()))


@dataclass(frozen=True)
class Precision:
    """The matmul precision of a stack: `name` is a --train_dtype value; `native` None detects per device
    (CUDA: native; CPU: its flags), True/False forces it (tests)."""

    name: str = "fp32"
    native: bool | None = None

    def __post_init__(self) -> None:
        if self.name not in TRAIN_DTYPES:
            raise ValueError(f"train_dtype must be one of {sorted(TRAIN_DTYPES)}, got {self.name!r}")

    @property
    def low(self) -> torch.dtype | None:
        """The operands' dtype; None for fp32 (no cast at all)."""
        return None if self.name == "fp32" else TRAIN_DTYPES[self.name]

    def is_native(self, device: torch.device) -> bool:
        if self.low is None:
            return True
        if self.native is not None:
            return self.native
        if device.type == "cuda":  # bf16 tensor cores from Ampere on; fp16 everywhere
            return self.name != "bf16" or torch.cuda.is_bf16_supported()
        return device.type == "cpu" and cpu_has_native(self.name)

    def describe(self, device: torch.device) -> str:
        """One line for a run's header: what --train_dtype does on this device."""
        if self.low is None:
            return "train_dtype fp32: every matmul in float32"
        how = "native" if self.is_native(device) else "EMULATED (operands rounded, fp32 matmuls: no native units)"
        return f"train_dtype {self.name}: big matmuls on {self.name} operands with fp32 results, {how} on {device}"

    def cast(self, t: Tensor, dtype: torch.dtype, native: bool) -> tuple[Tensor, Tensor | None]:
        """t as a matmul operand: in the low precision (native) or rounded to it and back in `dtype` (emulated),
        after fp16's power-of-two scaling; gives the scale (None: unscaled)."""
        assert self.low is not None
        scale = None
        if self.low is torch.float16:
            exponent = torch.frexp(t.detach().abs().amax().float()).exponent  # amax = m·2^e, m in [0.5, 1)
            scale = torch.ldexp(torch.ones((), device=t.device), -exponent)
            t = t * scale.to(t.dtype)
        if t.requires_grad and torch.is_grad_enabled():  # autograd (dense references, encode with grad): round
            # in the forward only, the gradient passing through unrounded as through a native matmul's operand
            return t.to(dtype) + (t.to(self.low).to(dtype) - t).detach(), scale
        low = t.to(self.low)
        return (low if native else low.to(dtype)), scale

    def bmm(self, a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
        """torch.bmm(a, b) in this precision; the result in `out`'s dtype, else a's and b's (at least fp32)."""
        return self.baddbmm(None, a, b, out)

    def baddbmm(self, bias: Tensor | None, a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
        """bias + a @ b (batched; bias broadcast, or None) in this precision, into `out` when given."""
        if self.low is None:  # the fp32 path is the plain call
            if bias is None:
                return torch.bmm(a, b, out=out)
            return torch.baddbmm(bias, a, b, out=out)
        dtype = out.dtype if out is not None else torch.promote_types(torch.promote_types(a.dtype, b.dtype), FLOAT)
        # Under autograd the emulated form serves every device: the same rounding, and differentiable.
        tracked = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
        native = self.is_native(a.device) and not tracked
        (a_low, sa), (b_low, sb) = self.cast(a, dtype, native), self.cast(b, dtype, native)
        if not native:
            prod = torch.bmm(a_low, b_low, out=out)
        elif a.device.type == "cuda":  # fp32 accumulation and result
            prod = torch.bmm(a_low, b_low, out_dtype=torch.float32).to(dtype)
        else:  # CPU units accumulate in fp32 but torch returns the low dtype: widened straight into place
            low = torch.bmm(a_low, b_low, out=_scratch(a_low.shape[0], a_low.shape[1], b_low.shape[2], a_low))
            prod = out.copy_(low) if out is not None else low.to(dtype)
        if sa is not None and sb is not None:
            prod.div_((sa * sb).to(dtype))
        if bias is not None:
            prod.add_(bias)
        if out is not None and prod is not out:
            return out.copy_(prod)
        return prod

    def cpu_bf16_product(self, a: Tensor, b: Tensor, out: Tensor) -> Tensor | None:
        """a @ b (batched) as a native CPU bf16 matmul gives it, bf16, into `out` (a bf16 buffer of the caller's),
        skipping the widening pass baddbmm makes: for a consumer that reads the product once and widens as it
        reads (the top-k kernel with an fp32 bias; the values are the same as from the widened product). None
        where this precision is not native bf16 on a CPU (the caller takes baddbmm's fp32 result)."""
        tracked = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
        if self.name != "bf16" or a.device.type != "cpu" or tracked or not self.is_native(a.device):
            return None
        return torch.bmm(self.cast(a, FLOAT, True)[0], self.cast(b, FLOAT, True)[0], out=out)


FP32 = Precision()

_SCRATCH: OrderedDict[tuple[Any, ...], Tensor] = OrderedDict()


def _scratch(m: int, n: int, p: int, like: Tensor) -> Tensor:
    """A reused [m, n, p] tensor for a native CPU matmul's low-precision result, which is widened into the caller's
    tensor right away: a fresh one costs a page fault per 4 KiB on every call (~25 ms for [4096, 8192] here,
    a fifth of the matmul). The last 8 shapes are kept: a training step uses a few."""
    key = (m, n, p, like.dtype, like.device)
    if key not in _SCRATCH:
        _SCRATCH[key] = torch.empty(m, n, p, dtype=like.dtype, device=like.device)
        while len(_SCRATCH) > 8:
            _SCRATCH.popitem(last=False)
    _SCRATCH.move_to_end(key)
    return _SCRATCH[key]
