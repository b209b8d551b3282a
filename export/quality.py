"""Image quality measures shared by ``export``'s report and the tests.

PSNR and SSIM compare a merged plan's images with the unmerged plan's images for the same seeds and
noise; FID compares generated crops with held-out real crops in the bundled classifier's feature space.
Images are float arrays in [-1, 1], NCHW.
"""

from __future__ import annotations

import numpy as np
from scipy import linalg
from scipy.ndimage import gaussian_filter

DATA_RANGE = 2.0  # images live in [-1, 1]


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = DATA_RANGE) -> np.ndarray:
    """Per-image PSNR in dB (inf for identical images)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(1)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(data_range**2 / mse)


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = DATA_RANGE, sigma: float = 1.5) -> np.ndarray:
    """Per-image SSIM (Wang et al. 2004; Gaussian window, sigma 1.5), averaged over channels and pixels.

    As in scikit-image, the mean leaves out the borders the window does not fit in (5 px at sigma 1.5).
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    blur = lambda x: gaussian_filter(x, sigma=(0, 0, sigma, sigma), mode="reflect", truncate=3.5)  # noqa: E731
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    pad = int(3.5 * sigma + 0.5)
    return s[..., pad:-pad, pad:-pad].reshape(len(a), -1).mean(1)


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
