"""Synthetic activations built from known ground-truth features (the toy data of the interim report
"Taking features out of superposition with sparse autoencoders"). The one generator every entry uses."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sparse_coding.config import Config, option
from sparse_coding.errors import ConfigError

MAGNITUDES = ("uniform", "uniform_product")


@dataclass
class ToyDataConfig(Config):
    activation_dim: int = option(256, "d, the dimension of the synthetic activations", gt=0)
    n_ground_truth: int = option(512, "number of true features (random unit vectors in R^d)", gt=0)
    mean_active: float = option(5.0, "expected number of true features firing per example", gt=0)
    feature_decay: float = option(0.99, "feature i fires with probability proportional to feature_decay**i", gt=0, le=1)
    magnitude: str = option(
        "uniform",
        "firing magnitudes: 'uniform' ~ U[0, 1); 'uniform_product' U·U, what the original code did by accident "
        "(biased towards 0; only to reproduce old numbers)",
        choices=MAGNITUDES,
    )
    correlated_components: bool = option(False, "correlate which features fire together (Gaussian copula)")
    correlation_rank: int = option(32, "rank of the random factor behind the copula's correlation matrix", gt=0)
    noise_std: float = option(0.0, "std of isotropic Gaussian noise added to each activation", ge=0)

    def check(self) -> None:
        super().check()
        d, n = self.feature_decay, self.n_ground_truth
        total = n if d == 1 else (1 - d**n) / (1 - d)  # Σ decay**i: feature 0 fires with mean_active / total
        if self.mean_active > total:
            raise ConfigError(
                f"mean_active={self.mean_active} needs firing probabilities above 1 with {self.n_ground_truth} "
                f"features and decay {self.feature_decay}; lower mean_active or raise n_ground_truth/feature_decay"
            )


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
        self.cfg, self.device = cfg, torch.device(device)
        setup = torch.Generator().manual_seed(seed)  # ground truth drawn on CPU: same features on any device
        n, d = cfg.n_ground_truth, cfg.activation_dim
        features = torch.randn(n, d, generator=setup)
        self.features = (features / features.norm(dim=-1, keepdim=True)).to(self.device)  # [n, d]
        probs = cfg.feature_decay ** torch.arange(n, dtype=torch.float64)
        probs = probs * (cfg.mean_active / probs.sum())
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
