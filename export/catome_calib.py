"""CA-ToMe threshold calibration: per bucket and merge point, how many src tokens match a dst with
cosine similarity >= T, counted on seeded denoising trajectories of the eager model.

The paper merges, at every call and block, the src tokens whose best match reaches T, so its token
count changes with the data. Our graphs need one static ``r`` per bucket: we count on calibration
trajectories what the paper would merge and derive ``r`` from those counts with a statistic.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import torch

from export.buckets import BucketSpec
from passes.tome import eager as tome_math
from passes.errors import DitmergeError
from passes.partition import draw_partition, num_dst

logger = logging.getLogger(__name__)

STATISTICS = ("mean", "median", "max", "min")  # or "pNN", a percentile


def check_statistic(statistic: str) -> None:
    if statistic not in STATISTICS and not re.fullmatch(r"p(100|[0-9]{1,2}(\.[0-9]+)?)", statistic):
        raise DitmergeError(f"statistic {statistic!r}: choose from {', '.join(STATISTICS)} or a percentile like p75")


def summarize(values: list[int] | np.ndarray, statistic: str) -> float:
    values = np.asarray(values, dtype=np.float64)
    if statistic == "mean":
        return float(values.mean())
    if statistic == "median":
        return float(np.median(values))
    if statistic in ("max", "min"):
        return float(getattr(values, statistic)())
    return float(np.percentile(values, float(statistic[1:])))


@torch.no_grad()
def count_trajectories(model: torch.nn.Module, family, blocks: dict[str, str], specs: list[BucketSpec],
                       grid: tuple[int, int], stride: tuple[int, int], bands: int, threshold: float, samples: int,
                       steps: int, guidance: float, seed: int, scheduler_config: dict | None,
                       text_len: int = 8) -> list[dict[str, list[int]]]:
    """Per bucket, per merge point (block -> its first merged module's path): one count per sample and step.

    Class-conditional models sample classes round-robin with classifier-free guidance; a sample's count
    at a step is the larger of its conditional and unconditional halves (the paper takes the maximum
    over the batch of a call). Other families (PixArt, SD3, Flux) get seeded random prompt embeddings and
    pooled projections, as diffusers' pipeline tests feed them (the export has no text encoder), and no
    guidance, so their counts are only a rough guide. Trajectories follow the model's own pipeline
    sampler (:func:`export.families.pipeline_scheduler`, with its timesteps set as the family's pipeline
    sets them: SD3's shift, Flux's sigmas and shift ``mu`` from the grid's token count) from seeded noise;
    a step counts in the bucket that covers its timestep (flow matching's t = T in the noisiest). The
    partition is drawn per step from a seeded stream, as the runtime draws it.
    """
    from export.families import pipeline_scheduler, pipeline_set_timesteps

    n = grid[0] * grid[1]
    num_src = n - num_dst(grid, stride)
    g = torch.Generator().manual_seed(seed)
    inputs = family.example_inputs(model, samples, grid, text_len, g)
    x = torch.randn(inputs["hidden_states"].shape, generator=g)
    num_classes = getattr(model.config, "num_embeds_ada_norm", None)
    cfg_on = family.name == "dit" and num_classes is not None and guidance > 1
    if family.name == "dit" and num_classes is not None:
        labels = torch.arange(samples) % num_classes
        inputs["class_labels"] = torch.cat([labels, torch.full_like(labels, num_classes)]) if cfg_on else labels
    else:
        logger.info("catome calibration: %s has no class labels; counting on random prompt embeddings, no guidance",
                    family.name)
    sched = pipeline_scheduler(scheduler_config)  # the family's own sampler (DPM-Solver for PixArt, ...)
    pipeline_set_timesteps(sched, family, steps, n)
    top = max(s.t_hi for s in specs)
    rng = np.random.default_rng(seed)

    captured: dict[str, torch.Tensor] = {}

    def hook_for(block: str):
        def hook(_module, args, kwargs):
            captured[block] = args[0] if args else kwargs["hidden_states"]
        return hook

    handles = [model.get_submodule(path).register_forward_pre_hook(hook_for(block), with_kwargs=True)
               for block, path in blocks.items()]
    counts: list[dict[str, list[int]]] = [{b: [] for b in blocks} for _ in specs]
    try:
        for t in sched.timesteps:
            # [t_lo, t_hi + 1), as the runtime maps a float timestep; above the top (flow's T) the noisiest
            which = [i for i, s in enumerate(specs) if s.t_lo <= float(t) < s.t_hi + 1 or
                     (s.t_hi == top and float(t) >= top + 1)]
            x_in = torch.cat([x, x]) if cfg_on else x
            scaled = sched.scale_model_input(x_in, t) if hasattr(sched, "scale_model_input") else x_in
            feed = {**inputs, "hidden_states": scaled,
                    "timestep": (t * family.timestep_scale).expand(len(x_in)).to(inputs["timestep"].dtype)}
            captured.clear()
            out = family.call(model, feed)
            part, _ = draw_partition(grid, stride, rng, bands)
            for block, h in captured.items():
                best, _ = tome_math.best_match(h, torch.from_numpy(part), num_src, bands)
                c = (best >= threshold).sum((1, 2))
                if cfg_on:
                    c = torch.maximum(c[:samples], c[samples:])
                if which:
                    counts[which[0]][block].extend(int(v) for v in c)
            eps = out[:, : x.shape[1]]
            if cfg_on:
                cond, uncond = eps.chunk(2)
                eps = uncond + guidance * (cond - uncond)
            x = sched.step(eps, t, x).prev_sample
    finally:
        for h in handles:
            h.remove()
    for spec, per_block in zip(specs, counts):
        if not any(per_block.values()):
            raise DitmergeError(f"no calibration step of {steps} falls in bucket [{spec.t_lo}, {spec.t_hi}]; "
                                "raise calib_steps or use wider buckets")
    return counts


def derive_r(per_block: dict[str, list[int]], statistic: str, num_src: int, bands: int) -> tuple[int, float]:
    """The bucket's r: ``statistic`` over every count of every merge point, rounded, clamped to the src
    count and floored to a multiple of the band count. Returns (r, the statistic's value)."""
    value = summarize([c for cs in per_block.values() for c in cs], statistic)
    r = min(round(value), num_src) // bands * bands
    return max(r, 0), value


def block_summary(counts: list[int]) -> dict:
    a = np.asarray(counts, dtype=np.float64)
    return {"mean": round(float(a.mean()), 3), "median": float(np.median(a)), "min": int(a.min()), "max": int(a.max()),
            "counts": [int(c) for c in counts]}
