"""Image quality measures shared by ``export``'s report and the tests.

PSNR and SSIM compare a merged plan's images with the unmerged plan's images for the same seeds and
noise; FID compares generated crops with held-out real crops in the bundled classifier's feature space.
Images are float arrays in [-1, 1], NCHW.
"""

from __future__ import annotations

import numpy as np
from scipy import linalg
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

DATA_RANGE = 2.0  # images live in [-1, 1]


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = DATA_RANGE) -> np.ndarray:
    """Per-image PSNR in dB (inf for identical images): scikit-image's, image by image (``b`` the reference)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    with np.errstate(divide="ignore"):
        return np.array([peak_signal_noise_ratio(y, x, data_range=data_range) for x, y in zip(a, b)])


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = DATA_RANGE, sigma: float = 1.5) -> np.ndarray:
    """Per-image SSIM (Wang et al. 2004): scikit-image's with a Gaussian window (sigma 1.5) and population
    covariances, as the paper defines it, averaged over channels and pixels (NCHW images)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.array([structural_similarity(x, y, channel_axis=0, data_range=data_range, gaussian_weights=True,
                                           sigma=sigma, use_sample_covariance=False) for x, y in zip(a, b)])


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """FID between two feature sets: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    if not np.isfinite(covmean).all():  # near-singular covariances: regularize as the reference FID code does
        eps = np.eye(len(s1)) * 1e-6
        covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean.real))


def summarize(values: np.ndarray, worst: str = "min") -> dict[str, float]:
    values = np.asarray(values, np.float64)
    finite = values[np.isfinite(values)]
    w = (finite.min() if worst == "min" else finite.max()) if len(finite) else float("inf")
    return {"mean": float(finite.mean()) if len(finite) else float("inf"), "worst": float(w)}
