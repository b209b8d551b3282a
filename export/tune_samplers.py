"""What the tuner generates: class-conditional samples (DiT), or images from a text family's own pipeline.

Both give images as float arrays in [-1, 1], NCHW (:mod:`export.quality`'s convention), one per job, and
both put the same jobs (seed, class or prompt) through the plan under test and the unmerged plan.
A text family (PixArt-alpha/Sigma, SD3, Flux) generates through its real diffusers pipeline loaded from
the model folder (its scheduler, its default guidance, decoded images) with the plan as
``pipe.transformer``; prompts are encoded once by the pipeline's text encoders, or prompt embeddings are
read from a safetensors file where the folder has none.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from passes.errors import DitmergeError

logger = logging.getLogger(__name__)

DEFAULT_PROMPTS = ("a photo of a red fox in the snow", "a bowl of fruit on a wooden table",
                   "a lighthouse on a cliff at sunset", "a city street at night in the rain")
# the pipeline call's embedding arguments per family; the negative ones only where guidance is batched in
EMBEDS = {"pixart": ("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask"),
          "sd3": ("prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds"),
          "flux": ("prompt_embeds", "pooled_prompt_embeds")}
NO_ENCODER_NEEDED = {"text_encoder_3", "tokenizer_3"}  # SD3 runs without its T5 (zeros in its place)


class ClassSampler:
    """Class-conditional DDIM sampling with guidance (:mod:`runtime.generate`), classes round-robin."""

    chunk = 8  # images per denoising loop (batch 16 with guidance)
    batch = 2  # one image with guidance: the batch per-forward latencies are timed at

    def __init__(self, labels: np.ndarray, steps: int, guidance: float, scheduler: dict | None) -> None:
        self.labels, self.steps, self.guidance, self.sched = labels, steps, guidance, scheduler
        self.text_len = None

    def key(self) -> dict:
        return {"classes": self.labels.tolist()}

    def describe(self) -> str:
        return "DDIM"

    def jobs(self, count: int, seed0: int) -> list[tuple[list[int], int]]:
        return [([int(self.labels[i % len(self.labels)])], seed0 + i) for i in range(count)]

    def images(self, tf, jobs: list) -> np.ndarray:
        from runtime.generate import sample_batch

        return np.concatenate(sample_batch(tf, jobs, steps=self.steps, guidance=self.guidance, partition_seed=0,
                                           scheduler_config=self.sched))

    def one(self, tf) -> None:
        from runtime.generate import sample_classes

        sample_classes(tf, np.array([int(self.labels[0])]), steps=self.steps, guidance=self.guidance,
                       scheduler_config=self.sched, progress=False)

    def timesteps(self, scale: float) -> list[float]:
        """The training-scale timestep of each call of one generation."""
        from runtime.generate import make_scheduler

        sched = make_scheduler(self.sched)
        sched.set_timesteps(self.steps)
        return [float(t) / scale for t in sched.timesteps]


class TextSampler:
    """One image per (prompt, seed) through the family's diffusers pipeline, ``output_type="np"``."""

    chunk = 1  # one pipeline call per image: the calls of one loop are one image's

    def __init__(self, pipe, family: str, grid: tuple[int, int], patch: int, embeds: list[dict[str, torch.Tensor]],
                 steps: int, guidance: float, key: dict) -> None:
        self.pipe, self.family, self.embeds, self.steps, self.guidance = pipe, family, embeds, steps, guidance
        self._key = key
        self.text_len = int(embeds[0]["prompt_embeds"].shape[1])
        self.batch = 2 if family in ("pixart", "sd3") and guidance > 1 else 1  # CFG halves batched into one call
        vsf = pipe.vae_scale_factor
        scale = 2 * vsf if family == "flux" else vsf * patch  # the plan's grid in pixels (Flux: 2x2 latents a token)
        self.size = {"height": grid[0] * scale, "width": grid[1] * scale}

    def key(self) -> dict:
        return self._key

    def describe(self) -> str:
        return f"{type(self.pipe).__name__} with {type(self.pipe.scheduler).__name__}"

    def jobs(self, count: int, seed0: int) -> list[tuple[int, int]]:
        return [(i % len(self.embeds), seed0 + i) for i in range(count)]

    @torch.no_grad()
    def images(self, tf, jobs: list) -> np.ndarray:
        if self.pipe.transformer is not tf:
            tf.check_scheduler(self.pipe.scheduler)
            self.pipe.transformer = tf
        out = []
        for prompt, seed in jobs:
            tf.reset(0)  # the plan's partition stream: the same for every image, as sample_batch keeps it
            kwargs = {**self.embeds[prompt], **self.size, "num_inference_steps": self.steps,
                      "guidance_scale": self.guidance, "output_type": "np"}
            if self.family == "pixart":
                kwargs["negative_prompt"] = None  # its default "" would be encoded again: it is in the embeddings
            out.append(self.pipe(**kwargs, generator=torch.Generator().manual_seed(seed)).images)
        x = np.concatenate(out).astype(np.float32)  # NHWC in [0, 1]
        return x.transpose(0, 3, 1, 2) * 2 - 1

    def one(self, tf) -> None:
        self.images(tf, [(0, 0)])

    def timesteps(self, scale: float) -> None:
        return None  # the pipeline's own: recorded from the reference generation


def make_sampler(manifest: dict, classes: Sequence[int] | None, prompts: Sequence[str] | str | Path | None,
                 prompt_embeds: str | Path | None, steps: int, guidance: float | None):
    """The sampler of the built plan's family, with its inputs checked."""
    m = manifest["model"]
    family = m["family"]
    if family == "dit":
        if prompts is not None or prompt_embeds is not None:
            raise DitmergeError("prompts and prompt embeddings are for text-to-image models; this one is "
                                "class-conditional (choose its classes with --classes)")
        n = m["config"]["num_embeds_ada_norm"]
        labels = np.asarray(list(classes) if classes else range(n), np.int64)
        if labels.min() < 0 or labels.max() >= n:
            raise DitmergeError(f"classes must be in 0..{n - 1}, got {labels.tolist()}")
        return ClassSampler(labels, steps, 4.0 if guidance is None else guidance, m.get("scheduler"))
    if family not in EMBEDS:
        raise DitmergeError(f"the tuner does not know how to generate with a {family} model")
    if classes:
        raise DitmergeError(f"a {m['class']} takes prompts, not class labels: give --prompts FILE (one per line)")
    if prompts is not None and prompt_embeds is not None:
        raise DitmergeError("give prompts or prompt embeddings, not both")
    pipe = _load_pipeline(m["source"], text=prompt_embeds is None)
    pipe.set_progress_bar_config(disable=True)
    if prompt_embeds is not None:
        embeds, key = _read_embeds(Path(prompt_embeds), family), {"prompt_embeds": _sha256(Path(prompt_embeds))}
    else:
        texts = _prompts(prompts)
        embeds, key = [_encode(pipe, family, p) for p in texts], {"prompts": texts}
    if guidance is None:
        guidance = float(inspect.signature(type(pipe).__call__).parameters["guidance_scale"].default)
    key["pipeline"] = type(pipe).__name__
    return TextSampler(pipe, family, tuple(m["grid"]), int(m["config"].get("patch_size") or 1), embeds, steps, guidance, key)


def _prompts(prompts: Sequence[str] | str | Path | None) -> list[str]:
    if prompts is None:
        return list(DEFAULT_PROMPTS)
    if isinstance(prompts, (str, Path)):
        path = Path(prompts)
        if not path.is_file():
            raise DitmergeError(f"--prompts {path}: no such file (one prompt per line)")
        prompts = [line.strip() for line in path.read_text().splitlines()]
    texts = [p for p in prompts if p.strip()]
    if not texts:
        raise DitmergeError("the prompt list is empty: give at least one prompt (one per line)")
    return texts


def _load_pipeline(source: str, text: bool):
    """The model's diffusers pipeline without its transformer (the plan takes its place); without its text
    encoders when embeddings are given."""
    from diffusers import DiffusionPipeline

    folder = Path(source)
    index = folder / "model_index.json"
    if folder.is_dir() and not index.is_file():
        raise DitmergeError(f"the tuner generates through the model's diffusers pipeline, and {source} is no pipeline "
                            "folder (no model_index.json): pass the folder of a saved pipeline (pipe.save_pretrained), "
                            "with its vae and scheduler")
    if folder.is_dir():
        components = json.loads(index.read_text())
    else:
        from huggingface_hub import hf_hub_download

        components = json.loads(Path(hf_hub_download(source, "model_index.json")).read_text())
    texts = [k for k in components if k.startswith(("text_encoder", "tokenizer"))]
    missing = [k for k in texts if k not in NO_ENCODER_NEEDED and not (components[k] or [None])[0]]
    if text and missing:
        raise DitmergeError(f"{source} has no {', '.join(missing)}, so the tuner cannot encode prompts: give prompt "
                            "embeddings instead (--prompt-embeds FILE.safetensors, or prompt_embeds= in the library; "
                            "docs/tuner.md says which tensors)")
    skip = {"transformer": None, **({k: None for k in texts} if not text else {})}
    try:
        pipe = DiffusionPipeline.from_pretrained(source, torch_dtype=torch.float32, **skip)
    except (OSError, ValueError) as e:
        raise DitmergeError(f"could not load the pipeline of {source!r}: {str(e).splitlines()[0]}") from e
    if getattr(pipe, "vae", None) is None:
        raise DitmergeError(f"the pipeline of {source} has no vae: the tuner compares decoded images")
    return pipe


@torch.no_grad()
def _encode(pipe, family: str, prompt: str) -> dict[str, torch.Tensor]:
    """The pipeline call's embedding arguments for one prompt (and the empty negative prompt), encoded once."""
    if family == "pixart":
        values = pipe.encode_prompt(prompt, do_classifier_free_guidance=True)
    elif family == "sd3":
        values = pipe.encode_prompt(prompt, None, None, do_classifier_free_guidance=True)
    else:
        values = pipe.encode_prompt(prompt, None)[:2]
    return dict(zip(EMBEDS[family], values))


def _read_embeds(path: Path, family: str) -> list[dict[str, torch.Tensor]]:
    """Per-prompt embedding arguments from a safetensors file: each tensor's first axis is the prompt."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise DitmergeError(f"--prompt-embeds {path}: no such file")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise DitmergeError(f"--prompt-embeds {path} is not a readable safetensors file: {e}") from e
    need = EMBEDS[family]
    missing = [k for k in need if k not in tensors]
    if missing:
        raise DitmergeError(f"--prompt-embeds {path} lacks {', '.join(missing)}: a {family} pipeline takes "
                            f"{', '.join(need)}, each with the prompt as its first axis")
    n = {int(tensors[k].shape[0]) for k in need}
    if len(n) != 1 or n == {0}:
        raise DitmergeError(f"--prompt-embeds {path}: {', '.join(need)} must hold the same number of prompts "
                            f"(first axis), got {sorted(n)}")
    return [{k: tensors[k][i:i + 1] for k in need} for i in range(n.pop())]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else str(path)
