"""The quality measures on cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from export.quality import frechet_distance, psnr, ssim, summarize


def _images(seed=0, n=4):
    return np.random.default_rng(seed).uniform(-1, 1, size=(n, 3, 32, 32))


def test_psnr_identical_is_infinite_and_known_noise_gives_its_db():
    x = _images()
    assert np.isinf(psnr(x, x)).all()
    # a constant offset of 0.02 on a range of 2: PSNR = 10 log10(2^2 / 0.02^2) = 40 dB exactly
    np.testing.assert_allclose(psnr(x + 0.02, x), 40.0, atol=1e-9)
    noise = np.random.default_rng(1).normal(0, 0.1, size=x.shape)
    np.testing.assert_allclose(psnr(x + noise, x), 10 * np.log10(4 / 0.01), atol=0.2)


def test_ssim_is_one_for_identical_and_falls_with_noise():
    x = _images()
    np.testing.assert_allclose(ssim(x, x), 1.0, atol=1e-12)
    rng = np.random.default_rng(2)
    s_small, s_big = (ssim(x + rng.normal(0, sd, x.shape), x).mean() for sd in (0.05, 0.5))
    assert 1 > s_small > s_big > 0


def _ssim_by_hand(a: np.ndarray, b: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    """SSIM written out from Wang et al. (2004): Gaussian local means, population variances and covariance,
    C1 = (0.01 L)^2, C2 = (0.03 L)^2 with L = 2, averaged where the truncated window fits (scikit-image's crop)."""
    from scipy.ndimage import gaussian_filter

    c1, c2 = (0.01 * 2.0) ** 2, (0.03 * 2.0) ** 2
    def blur(x):
        return gaussian_filter(x, sigma=(0, 0, sigma, sigma), mode="reflect", truncate=3.5)
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    pad = int(3.5 * sigma + 0.5)
    return s[..., pad:-pad, pad:-pad].reshape(len(a), -1).mean(1)


def test_ssim_and_psnr_agree_with_the_formulas_written_out():
    """export.quality takes both from scikit-image; they must still be the paper's measures on our NCHW
    batches in [-1, 1] (per image, channels averaged, the [-1, 1] range), not, say, the sample-covariance SSIM."""
    x, y = _images(3, 3), _images(4, 3) * 0.5 + _images(3, 3) * 0.5
    np.testing.assert_allclose(ssim(x, y), _ssim_by_hand(x, y), atol=1e-6)
    mse = ((x - y) ** 2).reshape(3, -1).mean(1)
    np.testing.assert_allclose(psnr(x, y), 10 * np.log10(4 / mse), atol=1e-9)
    assert not np.allclose(ssim(x, y), _ssim_by_hand(x, y[::-1]), atol=1e-3)  # per image, in order


def test_fid_of_a_set_with_itself_is_zero_and_of_a_shift_is_the_squared_shift():
    f = np.random.default_rng(5).normal(size=(2000, 8))
    assert abs(frechet_distance(f, f)) < 1e-6
    shift = np.full(8, 0.5)
    assert frechet_distance(f + shift, f) == pytest.approx(8 * 0.25, rel=1e-6)


def test_summarize_reports_mean_and_worst_of_finite_values():
    assert summarize(np.array([30.0, 20.0, np.inf]), "min") == {"mean": 25.0, "worst": 20.0}
