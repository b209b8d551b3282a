"""The plans of the GPU check (benchmarks/gpu_check.py): their models, how they are built, and how to call them.

All random-init except the bundled model; no network. Kept apart from the check itself so the tests in
tests/trt build the same plans.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import time
from pathlib import Path

import torch

logger = logging.getLogger("gpu_check")

BUCKETS = "999-500:0.5,499-0:0"  # a merged bucket (t >= 500, ratio 0.5) and an unmerged one


@dataclasses.dataclass
class PlanSpec:
    """One plan of the check: how to make its model, its grid, and whether to time torch.compile."""

    name: str
    make: object  # () -> diffusers transformer (None: the bundled model)
    grid: tuple[int, int] | None = None
    compile: bool = False
    gen_steps: int = 8


def _dit_xl4():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    # DiT-XL/2 width (1152 = 16 heads x 72), 4 of its 28 blocks, 64x64 latents -> 32x32 = 1024 tokens
    return DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                                 num_layers=4, sample_size=64, patch_size=2, num_embeds_ada_norm=1000).eval()


def _sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                                 num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
                                 pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16).eval()


def _flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=16, axes_dims_rope=(4, 6, 6)).eval()


SPECS = {
    "bundled": PlanSpec("bundled", None, gen_steps=10),
    "dit-xl4": PlanSpec("dit-xl4", _dit_xl4, (32, 32), compile=True),
    "sd3": PlanSpec("sd3", _sd3, (8, 8)),
    "flux": PlanSpec("flux", _flux, (8, 8)),
}


def versions() -> dict:
    import onnx
    import onnxruntime

    out = {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
           "onnxruntime": onnxruntime.__version__, "cuda": torch.version.cuda}
    try:
        import diffusers

        out["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    try:
        import tensorrt

        out["tensorrt"] = tensorrt.__version__
    except ImportError:
        out["tensorrt"] = None
    return out


def build(spec: PlanSpec, root: Path, buckets: str = BUCKETS, suffix: str = "",
          options: dict | None = None) -> tuple[Path, torch.nn.Module]:
    """The plan's graphs (onnxruntime only) and the eager model they were exported from."""
    from export.build import build_plan
    from export.load import builtin_tiny_dit

    out = root / (spec.name + suffix)
    if spec.make is None:
        model, source = builtin_tiny_dit(), "builtin:tiny-dit"
    else:
        model = spec.make()
        source = str(root / f"{spec.name}-model")
        if not Path(source).exists():
            model.save_pretrained(source)
    t0 = time.perf_counter()
    build_plan(source, buckets=buckets, out=out, grid=spec.grid, measure=False, progress=False, options=options)
    logger.info("%s: plan built in %.1f s", spec.name, time.perf_counter() - t0)
    return out, model.eval()


def example(tf, model, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Example call inputs of the plan's family (``export.families``), at the plan's grid."""
    from export.families import family_of

    fam = family_of(model)
    return fam.example_inputs(model, batch, tuple(tf.grid), 8, torch.Generator().manual_seed(seed))


def call(fam_model, target, x: dict, t_train: float, scale: float):
    """One forward of ``target`` (plan or eager model) on ``x`` at training-scale timestep ``t_train``."""
    from export.families import family_of

    fam = family_of(fam_model)
    x = dict(x)
    ref = x["timestep"]
    x["timestep"] = torch.full_like(ref, t_train * scale, dtype=ref.dtype if ref.is_floating_point() else torch.int64)
    return fam.call(target, x)
