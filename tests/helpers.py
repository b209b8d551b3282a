"""Shared test helpers: tolerances stated once, tiny models of the four families, comparisons."""

from __future__ import annotations

import numpy as np
import torch

EXPORT_ATOL = 1e-4  # unmerged graph vs eager diffusers model, fp32 (docs/design.md, 'The plan')
METHOD_ATOL = 1e-4  # merged graph vs its eager twin with the same partition, fp32


def assert_close(actual: np.ndarray, expected: np.ndarray, atol: float, what: str = "") -> float:
    """Max abs error <= atol, or fail with the error and where the mismatches are."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = np.abs(actual - expected)
    worst = float(err.max())
    if not worst <= atol:  # also catches NaN
        bad = np.argwhere(err > atol)
        raise AssertionError(f"{what}: max abs error {worst:.3e} > {atol:.0e} at {len(bad)} of {err.size} elements, "
                             f"first at {bad[:5].tolist()}")
    return worst


def tiny_dit(sample_size: int = 8, num_classes: int = 10, layers: int = 2, seed: int = 0):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                 num_layers=layers, sample_size=sample_size, patch_size=2,
                                 num_embeds_ada_norm=num_classes).eval()


def tiny_pixart(sample_size: int = 8, seed: int = 0):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                    num_layers=2, sample_size=sample_size, patch_size=2, cross_attention_dim=16,
                                    caption_channels=32, norm_type="ada_norm_single", num_embeds_ada_norm=1000).eval()


def tiny_sd3(sample_size: int = 8, seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=sample_size, patch_size=2, in_channels=4, num_layers=2,
                                 attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                 caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
                                 pos_embed_max_size=16).eval()


def tiny_flux(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                                  axes_dims_rope=(4, 2, 2)).eval()


# family -> (factory(grid) -> model, two grids to test)
FAMILIES = {
    "dit": (lambda grid: tiny_dit(sample_size=grid[0] * 2), [(4, 4), (6, 6)]),
    "pixart": (lambda grid: tiny_pixart(sample_size=grid[0] * 2), [(4, 4), (6, 6)]),
    "sd3": (lambda grid: tiny_sd3(sample_size=grid[0] * 2), [(4, 4), (6, 6)]),
    "flux": (lambda grid: tiny_flux(), [(4, 4), (4, 6)]),
}
