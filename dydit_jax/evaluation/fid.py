"""FID and sFID: Gaussian statistics of Inception features and their Frechet distance.

As the ADM evaluator (openai/guided-diffusion `evaluations/evaluator.py`) computes them:
- FID uses the pool_3 features [N, 2048]; sFID the spatial features [N, 17, 17, 7] flattened
  in (h, w, c) order to [N, 2023];
- mu = mean, sigma = np.cov(rowvar=False) (the N - 1 normalisation), both float64 on the host;
- d = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 @ sigma2)), the matrix square
  root by scipy.linalg.sqrtm; if it is not finite, 1e-6 is added to both diagonals; an imaginary
  part is dropped if the diagonal's is below 1e-3, an error otherwise.
"""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np
from scipy import linalg


@dataclasses.dataclass(frozen=True)
class FIDStatistics:
    """mu: [D] and sigma: [D, D], float64."""
    mu: np.ndarray
    sigma: np.ndarray

    def __post_init__(self):
        mu, sigma = np.asarray(self.mu, np.float64), np.asarray(self.sigma, np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"FID statistics need mu [D] and sigma [D, D], got mu {mu.shape} "
                             f"and sigma {sigma.shape}")
        object.__setattr__(self, "mu", mu)
        object.__setattr__(self, "sigma", sigma)


def compute_statistics(features) -> FIDStatistics:
    """Statistics of features [N, ...] (flattened per example), in float64."""
    x = np.asarray(features, np.float64).reshape(len(features), -1)
    if x.shape[0] < 2:
        raise ValueError(f"FID statistics need at least 2 feature vectors, got {x.shape[0]}")
    return FIDStatistics(x.mean(axis=0), np.cov(x, rowvar=False))


def frechet_distance(a: FIDStatistics, b: FIDStatistics, eps: float = 1e-6) -> float:
    """The Frechet distance between N(a.mu, a.sigma) and N(b.mu, b.sigma)."""
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"FID statistics of different feature sizes: {a.mu.shape} vs "
                         f"{b.mu.shape} (pool statistics against spatial ones?)")
    diff = a.mu - b.mu
    covmean = linalg.sqrtm(a.sigma @ b.sigma)
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: sqrtm of a singular product; adding {eps} to the diagonals",
                      stacklevel=2)
        offset = np.eye(a.sigma.shape[0]) * eps
        covmean = linalg.sqrtm((a.sigma + offset) @ (b.sigma + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: sqrtm has an imaginary component of "
                             f"{np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean))


def fid_from_features(features_a, features_b) -> float:
    """FID (or sFID, given spatial features) between two feature sets [N, ...]."""
    return frechet_distance(compute_statistics(features_a), compute_statistics(features_b))
