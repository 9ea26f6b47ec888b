"""PrecisionCheck: runs a fast-path-against-dense-autograd test in fp32, bf16 or fp16 (tests/saes' `train_dtype`).

On a CPU the low precision is emulated here whatever the CPU has (rounded operands, exact products), so the test
checks the math alike on every machine; a CPU with bf16 units also rounds each product, which
tests/saes/test_precision.py checks on its own. On CUDA the native path runs. The dense references call the SAE's
own `pre_acts`/`encode`/`decode`, which round their operands exactly as the fast path's forward does
(saes/precision.py), so the losses agree to float64 accuracy. The gradients cannot agree
exactly: the fast backward rounds its operands (the output's gradient, the codes' gradient) too, where autograd of
the rounded forward passes them unrounded. Their difference is a few units of the low precision's rounding, so
the low-precision gradients are compared by relative norm, with a bound of about three units of rounding error."""

from __future__ import annotations

import torch
from torch import Tensor

from sparse_coding.saes import SAE
from sparse_coding.saes.precision import Precision

# ‖fast − dense‖ / ‖dense‖ allowed per parameter: bf16 rounds to 2⁻⁹ relative, fp16 to 2⁻¹² (unit roundoff)
GRAD_RTOL = {"bf16": 1.5e-2, "fp16": 2e-3}


class PrecisionCheck:
    """Sets a stack's precision and compares its fast path with the dense reference under that precision."""

    def __init__(self, name: str):
        self.name, self.precision = name, Precision(name)

    def apply(self, sae: SAE) -> SAE:
        on_cpu = sae.W_dec.device.type == "cpu"
        self.precision = Precision(self.name, native=False if on_cpu and self.name != "fp32" else None)
        sae.precision = self.precision
        return sae

    def assert_loss(self, fast: Tensor, ref: Tensor) -> None:
        # CUDA's native matmul accumulates in fp32 where the dense reference (emulated, float64) does not; 1e-7:
        # the sparse paths differ from dense float64 by ~1e-9 (fp32 included), a rounding mismatch by ~1e-3
        native = fast.device.type == "cuda" and self.precision.low is not None
        assert torch.allclose(fast, ref, rtol=1e-5 if native else 1e-7, atol=1e-12), fast - ref

    def assert_grads(self, fast: dict[str, Tensor], sae: SAE) -> None:
        """fast: the fast path's gradients by name; the dense ones are in sae's .grad."""
        for n, p in sae.named_parameters():
            if self.precision.low is None:
                assert torch.allclose(fast[n], p.grad, atol=1e-10), n
            else:
                err = float((fast[n] - p.grad).norm() / p.grad.norm().clamp_min(1e-30))
                assert err < GRAD_RTOL[self.name], (n, err)
