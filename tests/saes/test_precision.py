"""--train_dtype (saes/precision.py): the matmul helper's rounding and scaling, fp32 left exactly as it was, and bf16
training as good as fp32 on a small toy problem. The per-architecture gradient checks in each precision are the
fast-path tests of test_saes.py and test_modern_saes.py (their `train_dtype` fixture)."""

from __future__ import annotations

import pytest
import torch

from sparse_coding.data.toy import ToyDataConfig, ToyGenerator
from sparse_coding.eval import metrics
from sparse_coding.saes import SAES, build_sae, precision
from sparse_coding.saes.base import target_variance
from sparse_coding.saes.precision import FP32, Precision
from sparse_coding.training.config import SweepConfig
from sparse_coding.training.trainer import Trainer, build_stacks


def _rounded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).double()


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_emulated_matmul_rounds_the_operands_and_keeps_an_fp32_result(name):
    low = precision.TRAIN_DTYPES[name]
    a, b, bias = torch.randn(2, 30, 40), torch.randn(2, 40, 50), torch.randn(2, 1, 50)
    out = Precision(name, native=False).baddbmm(bias, a, b)
    exact = torch.bmm(_rounded(a, low), _rounded(b, low)) + bias.double()  # rounded inputs, exact arithmetic
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), exact, rtol=0, atol=1e-4)  # fp32 accumulation of 40 terms
    plain = torch.baddbmm(bias, a, b).double()
    assert (out.double() - plain).abs().max() > 1e-3  # the operands really were rounded
    # a bf16 batch (as a store may give) is taken as it is
    assert Precision(name, native=False).bmm(a.to(torch.bfloat16), b).dtype == torch.float32


def test_native_cpu_matmul_agrees_with_the_emulation():
    """The path a CPU with bf16 units takes (torch's bf16 matmul, its result rounded to bf16) against emulation."""
    a, b = torch.randn(3, 16, 64), torch.randn(3, 64, 24)
    native = Precision("bf16", native=True).bmm(a, b)
    emulated = Precision("bf16", native=False).bmm(a, b)
    assert native.dtype == torch.float32
    assert torch.allclose(native, emulated, rtol=2**-7, atol=1e-2)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka", "clt", "clt_batchtopk"])
def test_sparse_selects_from_the_native_bf16_product_as_from_its_widened_copy(monkeypatch, arch):
    """A native CPU bf16 step hands the selection (per-row or batch-wide top-k) the bf16 product itself (the kernel
    adds the fp32 bias as it reads) instead of a widened fp32 copy: the same entries, values, loss and gradients,
    AuxK's dead latents too."""
    g = torch.Generator().manual_seed(0)
    L = 2 if arch.startswith("clt") else 1  # a CLT: two layers of 32 inputs, 64 latents and 16 outputs each
    x, target = torch.randn(96, 32 * L, generator=g), torch.randn(96, 16 * L, generator=g)
    shape = {"n_layers": L, "d_out": 16 * L} if L > 1 else {}
    results = []
    for skip_widening in (True, False):
        monkeypatch.setattr(SAES[arch], "selects_bf16", skip_widening)
        torch.manual_seed(0)
        sae = build_sae(arch, 32 * L, 128, [{"k": 4}, {"k": 8}], dead_tokens_threshold=1, **shape)
        sae.precision = Precision("bf16", native=True)
        sae.tokens_since_fired[:, ::3] = 10  # a third of the latents dead: AuxK reads the product too
        out = sae.train_forward(x, target=target if L > 1 else None)
        out.loss.sum().backward()
        assert ("pre_bf16" in sae._cache._buffers) == skip_widening  # the path the case names was taken
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in sae.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    for name, grad in grads_a.items():
        assert torch.equal(grad, grads_b[name]), name


def test_fp16_scales_tiny_gradients_instead_of_flushing_them():
    """A mean-squared-error gradient is ~1e-7 per entry: below fp16's smallest normal number (6e-5)."""
    g, w = torch.randn(1, 64, 32) * 1e-7, torch.randn(1, 32, 16)
    exact = torch.bmm(g.double(), w.double())
    scaled = Precision("fp16", native=False).bmm(g, w).double()
    unscaled = torch.bmm(g.half().double(), w.half().double())  # what a plain cast would give
    assert float((scaled - exact).norm() / exact.norm()) < 2e-3
    assert float((unscaled - exact).norm() / exact.norm()) > 0.1


def test_fp32_runs_the_plain_matmuls(monkeypatch):
    """fp32 is the path as it was: every architecture's step and encode/decode run without a single cast, and the
    helper's fp32 calls are torch's, bit for bit."""
    a, b, bias = torch.randn(2, 30, 40), torch.randn(2, 40, 50), torch.randn(2, 1, 50)
    assert torch.equal(FP32.baddbmm(bias, a, b), torch.baddbmm(bias, a, b))
    assert torch.equal(FP32.bmm(a, b), torch.bmm(a, b))

    def refuse(*args, **kwargs):
        raise AssertionError("fp32 cast an operand")

    monkeypatch.setattr(Precision, "cast", refuse)
    x = torch.randn(16, 8)
    for arch, cls in SAES.items():
        layers = {"n_layers": 2} if cls.cross_layer else {}  # a CLT or crosscoder over 2 layers of 4
        if cls.layer_transcoder:
            layers["d_out"] = 8
        sae = build_sae(arch, 8, 32, [{cls.knob: 2 if cls.knob == "k" else 0.1}], **layers)
        assert sae.precision is FP32
        sae.train_forward(x, **({"target": x} if cls.layer_transcoder else {})).loss.sum().backward()
        sae.reconstruct(x)


def test_the_config_sets_every_stacks_precision_and_the_header_says_how():
    cfg = SweepConfig(arch="relu,topk", train_dtype="bf16", dict_ratio_exp_low=0, dict_ratio_exp_high=1, k_values=[2])
    stacks = build_stacks(cfg, 8, torch.device("cpu"))
    assert {s.precision.name for s in stacks} == {"bf16"} and len(stacks) == 4
    assert all(s.folded(2.0).precision.name == "bf16" for s in stacks)
    with pytest.raises(Exception, match="train_dtype"):
        SweepConfig(train_dtype="fp8")
    assert "EMULATED" in Precision("bf16", native=False).describe(torch.device("cpu"))
    assert "native" in Precision("fp16").describe(torch.device("cuda"))  # bf16 on CUDA: where the GPU has it


def _train_and_score(arch: str, train_dtype: str) -> tuple[float, float]:
    """Trains one SAE on a toy problem (32 dims, 64 true features, dictionary of 64) for 400 steps of 512 and
    gives its held-out FVU and MMCS with the true features."""
    cfg = SweepConfig(
        arch=arch,
        train_dtype=train_dtype,
        l1_exp_low=-2,
        l1_exp_high=-2,
        k_values=[4],
        dict_ratio_exp_low=1,
        dict_ratio_exp_high=1,
        lr=3e-3,
        seed=0,
    )
    data = ToyDataConfig(activation_dim=32, n_ground_truth=64, mean_active=3.0)
    gen = ToyGenerator(data, seed=0, device="cpu")
    (sae,) = build_stacks(cfg, 32, torch.device("cpu"))
    trainer = Trainer([sae], lr=cfg.lr)
    for _ in range(400):
        trainer.step(gen.sample(512)[0])
    x = ToyGenerator(data, seed=0, device="cpu", sample_seed=99).sample(8192)[0]
    with torch.no_grad():
        fvu = float((sae.reconstruct(x)[0] - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    return fvu, float(metrics.mmcs(gen.features, sae.decoder()[0].detach()))


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_bf16_training_matches_fp32_quality(arch):
    fvu32, mmcs32 = _train_and_score(arch, "fp32")
    fvu16, mmcs16 = _train_and_score(arch, "bf16")
    assert fvu32 < 0.5 and mmcs32 > 0.5  # it learned something worth comparing
    # Not traded away: bf16 no worse than fp32 by 1 % of FVU or 0.01 of MMCS. One-sided: rounding sends TopK's
    # selections, hence the trajectory, elsewhere, and here bf16 ends ~6 % better than fp32 (0.103 vs 0.110).
    assert fvu16 <= 1.01 * fvu32, (fvu16, fvu32)
    assert mmcs16 >= mmcs32 - 0.01, (mmcs16, mmcs32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_target_variance_is_summed_in_fp32_per_block(dtype):
    """FVU's denominator against float64 by hand, whole and per block of columns (a CLT's layers): a bf16 batch's
    comes back float32 and within float32 rounding of the truth, where a bf16 sum keeps only ~3 digits."""
    target = (torch.randn(4096, 3 * 40, dtype=torch.float64) * 3 + 5).to(dtype)
    exact = target.double() - target.double().mean(0)
    blocks = exact.pow(2).view(4096, 3, 40).sum(dim=(0, 2))
    whole, per_block = target_variance(target), target_variance(target, 3)
    assert whole.dtype == per_block.dtype == torch.float32 and per_block.shape == (3,)
    torch.testing.assert_close(whole.double(), exact.pow(2).sum(), rtol=1e-5, atol=0)
    torch.testing.assert_close(per_block.double(), blocks, rtol=1e-5, atol=0)
