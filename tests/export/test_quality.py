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


def test_ssim_agrees_with_scikit_image():
    from skimage.metrics import structural_similarity

    x, y = _images(3, 1), _images(4, 1) * 0.5 + _images(3, 1) * 0.5
    ref = structural_similarity(x[0], y[0], channel_axis=0, data_range=2.0, gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False)
    assert abs(ssim(x, y)[0] - ref) < 2e-3


def test_fid_of_a_set_with_itself_is_zero_and_of_a_shift_is_the_squared_shift():
    f = np.random.default_rng(5).normal(size=(2000, 8))
    assert abs(frechet_distance(f, f)) < 1e-6
    shift = np.full(8, 0.5)
    assert frechet_distance(f + shift, f) == pytest.approx(8 * 0.25, rel=1e-6)


def test_summarize_reports_mean_and_worst_of_finite_values():
    assert summarize(np.array([30.0, 20.0, np.inf]), "min") == {"mean": 25.0, "worst": 20.0}
