"""Comparison directions for the SAE paper's autointerp table: neuron basis, PCA, ICA and random directions.

Each baseline is a set of unit directions [n, d] and a centre [d] fitted on dense activations x: [N, T, d];
`project` turns them into feature activations [N, T, n] for the same record → explain → score pipeline.
PCA, ICA and random directions have no natural sign, so each is flipped to make its activations' heavier tail
positive (the explainer looks at the largest activations). Neurons keep their own sign.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.decomposition import PCA, FastICA

from sparse_coding.errors import UserError

METHODS = ("neuron", "pca", "ica", "random")


def _flat(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 3:
        raise UserError(f"dense activations must be [N, T, d], got shape {tuple(x.shape)}")
    if not np.isfinite(x).all():
        raise UserError("dense activations contain NaN or inf")
    return x.reshape(-1, x.shape[-1])


def _fit_rows(flat: np.ndarray, max_fit_tokens: int, rng: np.random.Generator) -> np.ndarray:
    """A random subset of token rows: PCA/ICA fits need not see every token."""
    if len(flat) <= max_fit_tokens:
        return flat
    return flat[rng.choice(len(flat), size=max_fit_tokens, replace=False)]


def _orient(directions: np.ndarray, centre: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Flips each direction so the skew of its activations is >= 0."""
    z = (rows - centre) @ directions.T
    z = z - z.mean(axis=0)
    skew = (z**3).mean(axis=0)
    return directions * np.where(skew < 0, -1.0, 1.0)[:, None]


def baseline_directions(
    x: Any, method: str, n_features: int | None = None, seed: int = 0, max_fit_tokens: int = 100_000
) -> tuple[np.ndarray, np.ndarray]:
    """x: [N, T, d] → (directions [n, d] unit rows, centre [d]). n defaults to d (at most d for neuron/PCA/ICA)."""
    flat = _flat(x)
    d = flat.shape[1]
    n = d if n_features is None else int(n_features)
    if method not in METHODS:
        raise UserError(f"unknown baseline {method!r} (choose from {', '.join(METHODS)})")
    if method != "random" and not 1 <= n <= d:
        raise UserError(f"{method} gives at most d={d} directions, asked for {n}")
    rng = np.random.default_rng(seed)
    rows = _fit_rows(flat, max_fit_tokens, rng)
    if method == "neuron":
        return np.eye(d, dtype=np.float32)[:n], np.zeros(d, dtype=np.float32)
    if method == "random":
        dirs = rng.standard_normal((n, d))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        centre = np.zeros(d)
    elif method == "pca":
        pca = PCA(n_components=n, random_state=seed).fit(rows)
        dirs, centre = pca.components_, pca.mean_
    else:
        ica = FastICA(n_components=n, whiten="unit-variance", random_state=seed, max_iter=500, tol=1e-3).fit(rows)
        # The unmixing rows give the sources; as directions in activation space they need unit norm.
        dirs, centre = ica.components_, ica.mean_
        dirs = dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
    dirs = _orient(dirs, centre, rows)
    return dirs.astype(np.float32), np.asarray(centre, dtype=np.float32)


def project(x: Any, directions: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """x: [N, T, d] → feature activations [N, T, n] = (x − centre) · directionᵀ."""
    flat = _flat(x)
    N, T = np.shape(x)[:2]
    return ((flat - centre) @ directions.T).reshape(N, T, -1).astype(np.float32)


def baseline_activations(
    x: Any, method: str, n_features: int | None = None, seed: int = 0, max_fit_tokens: int = 100_000
) -> np.ndarray:
    """x: [N, T, d] dense activations → [N, T, n_features] activations of the `method` baseline's directions."""
    directions, centre = baseline_directions(x, method, n_features, seed, max_fit_tokens)
    return project(x, directions, centre)
