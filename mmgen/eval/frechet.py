"""Frechet distance between Gaussians fitted to features (FID / FVD maths).

    d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

(Dowson & Landau 1982; Heusel et al. 2017 for FID, Unterthiner et al. 2018 for FVD).
The reference implementations call ``scipy.linalg.sqrtm(S1 @ S2)`` and keep the
real part. Only the trace of that root is needed, and S1 S2 is similar to the
symmetric PSD matrix ``S1^(1/2) S2 S1^(1/2)`` (same eigenvalues), so here

    tr((S1 S2)^(1/2)) = sum_i sqrt(max(lambda_i(S1^(1/2) S2 S1^(1/2)), 0))

with two symmetric eigendecompositions: real, and stable for rank-deficient
covariances (fewer samples than feature dimensions), where ``sqrtm`` returns small
imaginary parts. As in pytorch-fid, when the result is not finite both covariances
get ``eps * I`` added and the distance is computed again.
"""

from __future__ import annotations

import numpy as np


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` (float64) of ``[N, D]`` features."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"feature_statistics needs [N >= 2, D] features, got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh(sigma)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    vals = np.linalg.eigvalsh((middle + middle.T) / 2.0)
    return float(np.sum(np.sqrt(np.clip(vals, 0.0, None))))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    Args:
      mu1, mu2: ``[D]`` means. sigma1, sigma2: ``[D, D]`` symmetric PSD covariances.
      eps: diagonal offset used only if the first attempt is not finite.
    Returns:
      float >= 0 (up to rounding).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(
            f"frechet_distance shapes disagree: mu {mu1.shape}/{mu2.shape}, sigma {sigma1.shape}/{sigma2.shape}"
        )
    diff = mu1 - mu2
    try:
        tr_covmean = _trace_sqrt_product(sigma1, sigma2)
    except np.linalg.LinAlgError:
        tr_covmean = float("nan")
    if not np.isfinite(tr_covmean):
        offset = eps * np.eye(sigma1.shape[0])
        tr_covmean = _trace_sqrt_product(sigma1 + offset, sigma2 + offset)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def frechet_distance_from_features(features1, features2) -> float:
    """Frechet distance between two ``[N, D]`` feature sets."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))
