"""Synthetic activations built from known ground-truth features (the toy data of the interim report
"Taking features out of superposition with sparse autoencoders"). The one generator every entry uses.

Beyond the report's data (independent features, firing rates decaying geometrically, uniform magnitudes) it can
give the data structure SAEs are known to struggle with: hierarchies (a child fires only when its parent does,
and its vector may contain its parent's), correlated and anti-correlated firing, Zipf firing rates and other
magnitude distributions. With every such option left at its default the output is bit-identical to the
report's generator (tests/data/test_toy.py holds the digests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from sparse_coding.config import Config, option
from sparse_coding.errors import ConfigError

MAGNITUDES = ("uniform", "uniform_product", "constant", "exponential", "lognormal")
FIRING = ("decay", "zipf")


@dataclass
class ToyDataConfig(Config):
    activation_dim: int = option(256, "d, the dimension of the synthetic activations", gt=0)
    n_ground_truth: int = option(512, "number of true features (random unit vectors in R^d)", gt=0)
    mean_active: float = option(5.0, "expected number of true features firing per example", gt=0)
    firing: str = option(
        "decay", "firing rates: 'decay' ∝ feature_decay**i (the report), 'zipf' ∝ (i+1)**-zipf_exponent", choices=FIRING
    )
    feature_decay: float = option(0.99, "feature i fires with probability proportional to feature_decay**i", gt=0, le=1)
    zipf_exponent: float = option(1.0, "firing zipf: feature i fires with probability ∝ (i+1)**-zipf_exponent", gt=0)
    magnitude: str = option(
        "uniform",
        "firing magnitudes: 'uniform' ~ U[0, 1); 'uniform_product' U·U, what the original code did by accident "
        "(biased towards 0; only to reproduce old numbers); 'constant', 'exponential', 'lognormal' with mean "
        "magnitude_mean",
        choices=MAGNITUDES,
    )
    magnitude_mean: float = option(1.0, "mean magnitude of the constant, exponential and lognormal choices", gt=0)
    magnitude_sigma: float = option(0.5, "lognormal magnitudes: standard deviation of their log", gt=0)
    correlated_components: bool = option(False, "correlate which features fire together (Gaussian copula)")
    correlation_rank: int = option(32, "rank of the random factor behind the copula's correlation matrix", gt=0)
    correlated_pairs: int = option(
        0, "pairs of features outside the hierarchy (2i, 2i+1 counted after it) whose firing is correlated", ge=0
    )
    pair_correlation: float = option(
        0.9, "copula correlation of each correlated pair; negative: anti-correlated", ge=-0.99, le=0.99
    )
    hierarchy_roots: int = option(0, "trees of features: the first (most frequent) features are their roots", ge=0)
    hierarchy_branching: int = option(2, "children per parent in each tree", gt=0)
    hierarchy_depth: int = option(1, "levels of children below each root", gt=0)
    child_prob: float = option(0.5, "probability that a parent firing also fires a child", gt=0, le=1)
    exclusive_children: bool = option(True, "at most one child of a parent fires at a time (else independently)")
    child_mix: float = option(0.0, "a child's vector is normalise(own + child_mix · parent's vector)", ge=0)
    noise_std: float = option(0.0, "std of isotropic Gaussian noise added to each activation", ge=0)
    n_layers: int = option(
        0,
        "0: the report's toy; L > 0: the cross-layer toy for CLTs, L layers of d-dimensional inputs and outputs, "
        "each true feature read in one layer and written into that layer and some later ones",
        ge=0,
    )
    write_prob: float = option(
        0.5, "cross-layer toy: a feature writes into each later layer with this probability", ge=0, le=1
    )
    layer_inputs: bool = option(
        True,
        "cross-layer toy: examples hold every layer's input, then its output (a CLT's pairs); false: the outputs "
        "alone (a crosscoder's data; --arch crosscoder sets it)",
    )

    def check(self) -> None:
        super().check()
        if self.n_tree_features > self.n_ground_truth:
            raise ConfigError(
                f"{self.hierarchy_roots} trees of depth {self.hierarchy_depth} and branching "
                f"{self.hierarchy_branching} need {self.n_tree_features} features; "
                f"n_ground_truth is {self.n_ground_truth}"
            )
        if self.correlated_pairs and self.correlated_components:
            raise ConfigError("correlated_pairs and correlated_components cannot be combined; choose one")
        if self.n_layers and self.n_ground_truth < self.n_layers:
            raise ConfigError(f"the cross-layer toy needs a true feature per layer at least ({self.n_layers} layers)")
        if self.n_tree_features + 2 * self.correlated_pairs > self.n_ground_truth:
            raise ConfigError(f"{self.correlated_pairs} correlated pairs do not fit beside the hierarchy's features")
        top = float(firing_rates(self).max())
        if top > 1:
            raise ConfigError(
                f"mean_active={self.mean_active} needs a firing probability of {top:.3g} > 1 with "
                f"{self.n_ground_truth} features and these rates; lower mean_active or spread the rates"
            )

    @property
    def n_tree_features(self) -> int:
        b = self.hierarchy_branching
        return self.hierarchy_roots * sum(b**level for level in range(self.hierarchy_depth + 1))


def firing_rates(cfg: ToyDataConfig) -> Tensor:
    """Gives each feature's marginal firing probability, float64 [n], scaled so mean_active fire on average.

    Free features and roots fire with base rates (decay or Zipf over the feature index); a child at level l
    of a tree fires with its root's rate times (child_prob / branching)**l when exactly one child fires at a
    time, times child_prob**l otherwise."""
    n = cfg.n_ground_truth
    i = torch.arange(n, dtype=torch.float64)
    rates = cfg.feature_decay**i if cfg.firing == "decay" else (i + 1) ** -cfg.zipf_exponent
    roots, b = cfg.hierarchy_roots, cfg.hierarchy_branching
    per_child = cfg.child_prob / b if cfg.exclusive_children else cfg.child_prob
    start = roots
    for level in range(1, cfg.hierarchy_depth + 1 if roots else 1):
        width = roots * b**level
        rates[start : start + width] = rates[:roots].repeat_interleave(b**level) * per_child**level
        start += width
    return rates * (cfg.mean_active / rates.sum())


class ToyGenerator:
    """Seeded, deterministic source of toy batches; holds the ground truth so metrics can use it.

    Firing: feature i fires independently with probability p_i, or, with correlated_components, when
    Φ(z_i) < p_i for z ~ N(0, Σ) drawn per example, Σ a random correlation matrix (factor model
    Σ ∝ A Aᵀ + I with A [n, correlation_rank]) whose Cholesky factor is computed once here. The copula keeps
    each feature's own firing rate p_i while correlating which features fire together; correlated_pairs uses
    the same copula with Σ the identity plus ±pair_correlation between the two features of each pair.

    Hierarchy: features 0..roots-1 are the roots of trees laid out level by level (root r's children at
    level 1 are roots + r·b .. roots + r·b + b - 1, and so on). A child can fire only where its parent fires.
    `parent` [n] holds each feature's parent (-1 for none) and `depth` [n] its level (-1 outside every tree).

    Cross-layer toy (n_layers L > 0), the ground truth a cross-layer transcoder should recover: feature i is read in
    layer i mod L, its input vector being the report's random unit vector there (`readers` [n, L·d], zero in the
    other layers), and it writes a random direction into its own layer's output and into each later layer's with
    probability write_prob (`features` [n, L·d]: the writes, concatenated over layers, unit norm). An example is
    every layer's input then every layer's output, [L·d + L·d]: what run.py gives a CLT.
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
        self.parent, self.depth = tree_layout(cfg)
        unit = features / features.norm(dim=-1, keepdim=True)
        self.features = _mix_parents(unit, self.parent, self.depth, cfg.child_mix)
        self.features = self.features.to(self.device)  # [n, d]
        self.probs = firing_rates(cfg).float().to(self.device)  # [n], marginal firing probabilities
        self.chol: Tensor | None = None
        if cfg.correlated_components:
            A = torch.randn(n, cfg.correlation_rank, generator=setup, dtype=torch.float64)
            cov = A @ A.T / cfg.correlation_rank + torch.eye(n, dtype=torch.float64)
            std = cov.diagonal().sqrt()
            corr = cov / std[:, None] / std[None, :]
            self.chol = torch.linalg.cholesky(corr).float().to(self.device)
        elif cfg.correlated_pairs:
            self.chol = _pair_cholesky(n, cfg.n_tree_features, cfg.correlated_pairs, cfg.pair_correlation)
            self.chol = self.chol.to(self.device)
        self.parent, self.depth = self.parent.to(self.device), self.depth.to(self.device)
        self.readers: Tensor | None = None
        if cfg.n_layers:
            self.readers, self.features = _cross_layer(self.features.cpu(), cfg.n_layers, cfg.write_prob, setup)
            self.readers, self.features = self.readers.to(self.device), self.features.to(self.device)
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
        if self.cfg.hierarchy_roots:
            active = self._descend(active)
        codes = active * self._magnitudes(batch)
        pairs = self.readers is not None and self.cfg.layer_inputs  # the layers' inputs, then their outputs
        x = codes @ (self.readers if pairs else self.features)
        if self.cfg.noise_std > 0:
            x = x + self.cfg.noise_std * torch.randn(*x.shape, generator=g, device=self.device)
        if pairs:
            x = torch.cat([x, codes @ self.features], dim=1)
        return x, codes

    def _descend(self, active: Tensor) -> Tensor:
        """Redraws the children's firing level by level: a child fires only where its parent does, with
        child_prob (one child of the parent chosen uniformly when exclusive_children)."""
        cfg, g = self.cfg, self.rng
        roots, b = cfg.hierarchy_roots, cfg.hierarchy_branching
        batch, start = active.shape[0], 0
        for level in range(1, cfg.hierarchy_depth + 1):
            n_par, n_child = roots * b ** (level - 1), roots * b**level
            parents = active[:, start : start + n_par]
            if cfg.exclusive_children:
                fires = torch.rand(batch, n_par, generator=g, device=self.device) < cfg.child_prob
                pick = torch.randint(0, b, (batch, n_par), generator=g, device=self.device)
                chosen = pick[..., None] == torch.arange(b, device=self.device)  # [batch, n_par, b]
                kids = (parents & fires)[..., None] & chosen
            else:
                kids = parents[..., None] & (
                    torch.rand(batch, n_par, b, generator=g, device=self.device) < cfg.child_prob
                )
            start += n_par
            active[:, start : start + n_child] = kids.reshape(batch, n_child)
        return active

    def _magnitudes(self, batch: int) -> Tensor:
        cfg, g, n = self.cfg, self.rng, self.cfg.n_ground_truth
        if cfg.magnitude == "constant":
            return torch.full((batch, n), cfg.magnitude_mean, device=self.device)
        u = torch.rand(batch, n, generator=g, device=self.device)
        if cfg.magnitude == "uniform_product":
            return u * torch.rand(batch, n, generator=g, device=self.device)
        if cfg.magnitude == "exponential":
            return -cfg.magnitude_mean * torch.log1p(-u)
        if cfg.magnitude == "lognormal":  # mean exp(μ + σ²/2) = magnitude_mean
            mu = math.log(cfg.magnitude_mean) - cfg.magnitude_sigma**2 / 2
            return torch.exp(mu + cfg.magnitude_sigma * torch.special.ndtri(u.clamp(1e-7, 1 - 1e-7)))
        return u

    def get_state(self) -> Tensor:
        return self.rng.get_state()

    def set_state(self, state: Tensor) -> None:
        self.rng.set_state(state)


def tree_layout(cfg: ToyDataConfig) -> tuple[Tensor, Tensor]:
    """Gives (parent [n], depth [n]) of the hierarchy: -1 where a feature has no parent / is in no tree."""
    n, roots, b = cfg.n_ground_truth, cfg.hierarchy_roots, cfg.hierarchy_branching
    parent = torch.full((n,), -1, dtype=torch.long)
    depth = torch.full((n,), -1, dtype=torch.long)
    if not roots:
        return parent, depth
    depth[:roots] = 0
    start, prev_start = roots, 0
    for level in range(1, cfg.hierarchy_depth + 1):
        width = roots * b**level
        parent[start : start + width] = prev_start + torch.arange(width) // b
        depth[start : start + width] = level
        prev_start, start = start, start + width
    return parent, depth


def _mix_parents(features: Tensor, parent: Tensor, depth: Tensor, mix: float) -> Tensor:
    """Adds mix · the parent's (already mixed) vector to each child's and renormalises, one tree level at a
    time, so a parent is mixed before its children read it."""
    if mix == 0:
        return features
    out = features.clone()
    for level in range(1, int(depth.max()) + 1):
        kids = torch.nonzero(depth == level).flatten()
        v = out[kids] + mix * out[parent[kids]]
        out[kids] = v / v.norm(dim=-1, keepdim=True)
    return out


def _pair_cholesky(n: int, first: int, pairs: int, rho: float) -> Tensor:
    """Cholesky factor of the identity with correlation rho between features first+2i and first+2i+1."""
    chol = torch.eye(n)
    a = first + 2 * torch.arange(pairs)
    chol[a + 1, a] = rho
    chol[a + 1, a + 1] = math.sqrt(1 - rho**2)
    return chol


def _cross_layer(unit: Tensor, L: int, write_prob: float, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """The cross-layer toy's (readers, writes), each [n, L·d], from the report's unit vectors [n, d]: feature i reads
    its vector in layer i mod L and writes a fresh random direction into that layer and each later one it reaches
    (with write_prob), its writes scaled to unit norm together."""
    n, d = unit.shape
    source = torch.arange(n) % L
    readers = torch.zeros(n, L, d)
    readers[torch.arange(n), source] = unit
    later = torch.arange(L)[None, :] > source[:, None]
    writes_to = (torch.arange(L)[None, :] == source[:, None]) | (later & (torch.rand(n, L, generator=g) < write_prob))
    writes = torch.randn(n, L, d, generator=g) * writes_to[..., None]
    writes = writes.flatten(1)
    return readers.flatten(1), writes / writes.norm(dim=-1, keepdim=True)
