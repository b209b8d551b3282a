"""Class-conditional sampling through a plan (or any diffusers-like transformer): DDIM with CFG.

The same loop as diffusers' DiTPipeline, except that the null label is the model's own
(``num_embeds_ada_norm``) rather than a hard-coded 1000, so small class-conditional models work too.
:func:`sample_batch` runs several requests (each its own labels and seed) as one batched loop and gives
each the samples :func:`sample_classes` gives it alone; the server batches with it.
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
                   seed: int = 0, scheduler_config: dict | None = None, progress: bool = True,
                   partition_seed: int | None = None) -> np.ndarray:
    """Generate one sample per label; returns the model-space samples, NCHW float32.

    Args:
        transformer: a diffusers ``DiTTransformer2DModel`` or a plan from ``runtime.load``.
        labels: class indices.
        steps: denoising steps.
        guidance: classifier-free guidance scale (1: no guidance, half the work).
        seed: seeds the initial noise (and, for a plan, its partition stream).
        scheduler_config: the training scheduler's config.
        progress: show a progress bar over the steps.
        partition_seed: seeds a plan's partition stream instead of ``seed`` (a server keeps it fixed so that
            requests with different seeds can share forwards).
    """
    return sample_batch(transformer, [(labels, seed)], steps=steps, guidance=guidance,
                        partition_seed=seed if partition_seed is None else partition_seed,
                        scheduler_config=scheduler_config, progress=progress)[0]


class DDIMUpdate:
    """diffusers' ``DDIMScheduler.step`` (eta 0, epsilon prediction) with each step's coefficients made once.

    The update is the scheduler's own tensor ops on the same 0-d coefficient tensors, so the samples equal
    ``scheduler.step(...).prev_sample`` bit for bit; what goes is the step's per-call Python (the variance,
    the branches, the output object), which is most of a step's time outside the transformer on small models.
    """

    def __init__(self, sched) -> None:
        self.clip = float(sched.config.clip_sample_range) if sched.config.clip_sample else None
        stride = sched.config.num_train_timesteps // sched.num_inference_steps
        self.coefs: dict[int, tuple[torch.Tensor, ...]] = {}
        for t in sched.timesteps:
            t = int(t)
            a = sched.alphas_cumprod[t]
            a_prev = sched.alphas_cumprod[t - stride] if t - stride >= 0 else sched.final_alpha_cumprod
            std_dev_t = 0.0 * sched._get_variance(t, t - stride) ** 0.5
            self.coefs[t] = ((1 - a) ** 0.5, a ** 0.5, a_prev ** 0.5, (1 - a_prev - std_dev_t ** 2) ** 0.5)

    @staticmethod
    def supports(sched) -> bool:
        from diffusers import DDIMScheduler

        cfg = sched.config
        return (type(sched) is DDIMScheduler and cfg.prediction_type == "epsilon" and not cfg.thresholding
                and sched.num_inference_steps is not None)

    def step(self, eps: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        sqrt_beta, sqrt_alpha, sqrt_alpha_prev, direction = self.coefs[int(t)]
        x0 = (x - sqrt_beta * eps) / sqrt_alpha
        if self.clip is not None:
            x0 = x0.clamp(-self.clip, self.clip)
        return sqrt_alpha_prev * x0 + direction * eps


def _check(cfg, labels, steps: int) -> np.ndarray:
    num_classes = cfg.num_embeds_ada_norm
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if num_classes is None:
        raise DitmergeError("this model is not class-conditional; generate through its diffusers pipeline")
    if len(labels) == 0 or labels.min() < 0 or labels.max() >= num_classes:
        raise DitmergeError(f"class labels must be in 0..{num_classes - 1}, got {labels.tolist()}")
    if steps < 1 or steps > 1000:
        raise DitmergeError(f"steps must be in 1..1000, got {steps}")
    return labels


@torch.no_grad()
def sample_batch(transformer, jobs: list[tuple[list[int] | np.ndarray, int]], steps: int = 50, guidance: float = 4.0,
                 partition_seed: int = 0, scheduler_config: dict | None = None,
                 progress: bool = False) -> list[np.ndarray]:
    """Several ``(labels, seed)`` jobs in one denoising loop: one forward per step for all of them.

    Job ``k``'s samples equal ``sample_classes(transformer, labels_k, steps, guidance, seed=seed_k,
    partition_seed=partition_seed)`` (which is this function with one job): each job draws its noise from
    its own seed exactly as it would alone, the loop makes one call per step (so a plan draws the same
    partition per step, shared by the whole batch as it is shared by one job's images), and the rest is
    per sample. The equality is exact where the backend computes each batch row independently of the
    others (onnxruntime on CPU does; tests/serve check it).
    """
    if not jobs:
        return []
    cfg = transformer.config
    num_classes, c, size = cfg.num_embeds_ada_norm, cfg.in_channels, cfg.sample_size
    labels = [_check(cfg, job_labels, steps) for job_labels, _ in jobs]
    if hasattr(transformer, "reset"):
        transformer.reset(partition_seed)
    sched = make_scheduler(scheduler_config)
    sched.set_timesteps(steps)
    update = DDIMUpdate(sched).step if DDIMUpdate.supports(sched) else (lambda e, t, x: sched.step(e, t, x).prev_sample)
    # 1. Noise: per job, from the job's seed, as sample_classes draws it
    x = torch.cat([torch.randn(len(lab), c, size, size, generator=torch.Generator().manual_seed(seed))
                   for lab, (_, seed) in zip(labels, jobs)])
    y = torch.from_numpy(np.concatenate(labels))
    cfg_on = guidance > 1
    y_in = torch.cat([y, torch.full_like(y, num_classes)]) if cfg_on else y
    # 2. One denoising loop over the concatenated batch
    for t in tqdm(sched.timesteps, desc="denoising", disable=not progress, leave=False):
        x_in = torch.cat([x, x]) if cfg_on else x
        x_in = sched.scale_model_input(x_in, t)
        out = transformer(x_in, timestep=t.expand(len(x_in)), class_labels=y_in).sample
        eps = out[:, :c]
        if cfg_on:
            cond, uncond = eps.chunk(2)
            eps = uncond + guidance * (cond - uncond)
        x = update(eps, t, x)
    # 3. Split back per job
    return [part.float().numpy() for part in torch.split(x, [len(lab) for lab in labels])]


def to_uint8(samples: np.ndarray) -> np.ndarray:
    """Pixel-space samples in [-1, 1], NCHW, to uint8 images, NHWC (what the PNGs hold)."""
    return ((np.clip(samples, -1, 1) + 1) * 127.5).round().astype(np.uint8).transpose(0, 2, 3, 1)
