"""Class-conditional sampling through a plan (or any diffusers-like transformer): DDIM with CFG.

The same loop as diffusers' DiTPipeline, except that the null label is the model's own
(``num_embeds_ada_norm``) rather than a hard-coded 1000, so small class-conditional models work too.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from passes.errors import DitmergeError


def make_scheduler(config: dict | None):
    """A DDIM sampler from the training scheduler's config (diffusers' default DDIM when None)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(config) if config else DDIMScheduler()


@torch.no_grad()
def sample_classes(transformer, labels: list[int] | np.ndarray, steps: int = 50, guidance: float = 4.0,
                   seed: int = 0, scheduler_config: dict | None = None, progress: bool = True) -> np.ndarray:
    """Generate one sample per label; returns the model-space samples, NCHW float32.

    Args:
        transformer: a diffusers ``DiTTransformer2DModel`` or a plan from ``runtime.load``.
        labels: class indices.
        steps: denoising steps.
        guidance: classifier-free guidance scale (1: no guidance, half the work).
        seed: seeds the initial noise (and, for a plan, its partition stream).
        scheduler_config: the training scheduler's config.
        progress: show a progress bar over the steps.
    """
    cfg = transformer.config
    num_classes = cfg.num_embeds_ada_norm
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if num_classes is None:
        raise DitmergeError("this model is not class-conditional; generate through its diffusers pipeline")
    if len(labels) == 0 or labels.min() < 0 or labels.max() >= num_classes:
        raise DitmergeError(f"class labels must be in 0..{num_classes - 1}, got {labels.tolist()}")
    if steps < 1 or steps > 1000:
        raise DitmergeError(f"steps must be in 1..1000, got {steps}")
    if hasattr(transformer, "reset"):
        transformer.reset(seed)
    sched = make_scheduler(scheduler_config)
    sched.set_timesteps(steps)
    n, c = len(labels), cfg.in_channels
    size = cfg.sample_size
    x = torch.randn(n, c, size, size, generator=torch.Generator().manual_seed(seed))
    y = torch.from_numpy(labels)
    cfg_on = guidance > 1
    y_in = torch.cat([y, torch.full_like(y, num_classes)]) if cfg_on else y
    for t in tqdm(sched.timesteps, desc="denoising", disable=not progress, leave=False):
        x_in = torch.cat([x, x]) if cfg_on else x
        x_in = sched.scale_model_input(x_in, t)
        out = transformer(x_in, timestep=t.expand(len(x_in)), class_labels=y_in).sample
        eps = out[:, :c]
        if cfg_on:
            cond, uncond = eps.chunk(2)
            eps = uncond + guidance * (cond - uncond)
        x = sched.step(eps, t, x).prev_sample
    return x.float().numpy()
