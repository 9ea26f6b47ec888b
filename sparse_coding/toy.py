"""Synthetic activations built from known ground-truth features (the toy data of the interim report
"Taking features out of superposition with sparse autoencoders"). The one generator every entry uses."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

MAGNITUDES = ("uniform", "uniform_product")


@dataclass
class ToyDataConfig:
    activation_dim: int = 256  # d: dimension of the synthetic activations
    n_ground_truth: int = 512  # number of true features (random unit vectors in R^d)
    mean_active: float = 5.0  # expected number of features firing per example
    feature_decay: float = 0.99  # feature i fires with probability ∝ feature_decay**i
    # 'uniform': magnitudes ~ U[0, 1). 'uniform_product': U·U, what the original code did by accident
    # (it biases magnitudes towards 0); kept only to reproduce old numbers.
    magnitude: str = "uniform"
    correlated_components: bool = False  # correlated firing through a Gaussian copula
    correlation_rank: int = 32  # rank of the random factor behind the copula's correlation matrix
    noise_std: float = 0.0  # std of isotropic Gaussian noise added to each activation


class ToyGenerator:
    """Seeded, deterministic source of toy batches; holds the ground truth so metrics can use it.

    Firing: feature i fires independently with probability p_i, or, with correlated_components, when
    Φ(z_i) < p_i for z ~ N(0, Σ) drawn per example, Σ a random correlation matrix (factor model
    Σ ∝ A Aᵀ + I with A [n, correlation_rank]) whose Cholesky factor is computed once here. The copula keeps
    each feature's own firing rate p_i while correlating which features fire together.
    """

    def __init__(
        self,
        cfg: ToyDataConfig,
        seed: int,
        device: torch.device | str = "cpu",
        sample_seed: int | None = None,
    ):
        """seed fixes the ground truth; sample_seed (default seed + 1) the stream of examples, so an
        evaluation set can share the features but not the examples."""
        check_toy_config(cfg)
        self.cfg, self.device = cfg, torch.device(device)
        setup = torch.Generator().manual_seed(seed)  # ground truth drawn on CPU: same features on any device
        n, d = cfg.n_ground_truth, cfg.activation_dim
        features = torch.randn(n, d, generator=setup)
        self.features = (features / features.norm(dim=-1, keepdim=True)).to(self.device)  # [n, d]
        probs = cfg.feature_decay ** torch.arange(n, dtype=torch.float64)
        probs = probs * (cfg.mean_active / probs.sum())
        if probs.max() > 1:
            raise ValueError(
                f"mean_active={cfg.mean_active} needs firing probabilities above 1 with {n} features and "
                f"decay {cfg.feature_decay}; lower mean_active or raise n_ground_truth/feature_decay"
            )
        self.probs = probs.float().to(self.device)  # [n]
        self.chol: Tensor | None = None
        if cfg.correlated_components:
            A = torch.randn(n, cfg.correlation_rank, generator=setup, dtype=torch.float64)
            cov = A @ A.T / cfg.correlation_rank + torch.eye(n, dtype=torch.float64)
            std = cov.diagonal().sqrt()
            corr = cov / std[:, None] / std[None, :]
            self.chol = torch.linalg.cholesky(corr).float().to(self.device)
        self.rng = torch.Generator(device=self.device).manual_seed(seed + 1 if sample_seed is None else sample_seed)

    def sample(self, batch: int) -> tuple[Tensor, Tensor]:
        """Gives (activations [batch, d], true codes [batch, n])."""
        n, g = self.cfg.n_ground_truth, self.rng
        if self.chol is None:
            u = torch.rand(batch, n, generator=g, device=self.device)
        else:
            z = torch.randn(batch, n, generator=g, device=self.device) @ self.chol.T
            u = torch.special.ndtr(z)  # Φ(z): uniform marginals, correlated jointly
        active = u < self.probs
        mags = torch.rand(batch, n, generator=g, device=self.device)
        if self.cfg.magnitude == "uniform_product":
            mags = mags * torch.rand(batch, n, generator=g, device=self.device)
        codes = active * mags
        x = codes @ self.features
        if self.cfg.noise_std > 0:
            x = x + self.cfg.noise_std * torch.randn(batch, self.cfg.activation_dim, generator=g, device=self.device)
        return x, codes

    def get_state(self) -> Tensor:
        return self.rng.get_state()

    def set_state(self, state: Tensor) -> None:
        self.rng.set_state(state)


def check_toy_config(cfg: ToyDataConfig) -> None:
    """Raises ValueError with a plain message for settings the generator cannot honour."""
    if cfg.activation_dim <= 0 or cfg.n_ground_truth <= 0:
        raise ValueError("activation_dim and n_ground_truth must be positive")
    if cfg.mean_active <= 0:
        raise ValueError("mean_active must be positive")
    if not 0 < cfg.feature_decay <= 1:
        raise ValueError("feature_decay must be in (0, 1]")
    if cfg.magnitude not in MAGNITUDES:
        raise ValueError(f"magnitude must be one of {MAGNITUDES}, got {cfg.magnitude!r}")
    if cfg.correlated_components and cfg.correlation_rank <= 0:
        raise ValueError("correlation_rank must be positive")
    if cfg.noise_std < 0:
        raise ValueError("noise_std must be non-negative")
