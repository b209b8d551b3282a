"""The peers bench.py times our graphs against: tomesd's eager patch (when installed)."""

from __future__ import annotations

import logging

import torch

from export.onnx_export import eager_forward

logger = logging.getLogger("bench")


def tomesd_call(model, inputs: dict, ratio: float, locations: str) -> dict:
    """tomesd's patch (same ratio; merge_attn / merge_mlp as ``locations``) on ``model`` (a fresh eager DiT), when
    tomesd is installed; nothing otherwise (logged)."""
    try:
        import tomesd
    except ImportError:
        logger.warning("tomesd is not installed: no tomesd timing")
        return {}
    locs = locations.split(",")
    # tomesd reads the token grid's downsample from the latent size: sqrt(latent pixels / tokens) = the patch size
    # for a DiT, so merging at the blocks' own resolution needs max_downsample >= patch_size (1 merges nothing)
    patch = int(model.config.patch_size)
    tomesd.apply_patch(model, ratio=ratio, max_downsample=patch, merge_attn="attn" in locs, merge_crossattn=False,
                       merge_mlp="mlp" in locs)
    with torch.no_grad():
        merged = eager_forward(model, inputs)
    tomesd.remove_patch(model)
    with torch.no_grad():
        plain = eager_forward(model, inputs)
    if float((merged - plain).abs().max()) == 0.0:
        raise RuntimeError("tomesd's patch changed nothing: it merged no tokens")
    tomesd.apply_patch(model, ratio=ratio, max_downsample=patch, merge_attn="attn" in locs, merge_crossattn=False,
                       merge_mlp="mlp" in locs)
    return {"tomesd": lambda: eager_forward(model, inputs)}
