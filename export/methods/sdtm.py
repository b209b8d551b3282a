"""SDTM (Structure-then-Detail Token Merging, Fang et al., CVPR 2025) as a plan method (docs/design.md, SDTM).

Stages as buckets. The method is defined over a reference schedule of ``steps`` denoising steps
(default 50): steps ``s < switch_step`` form the *structure* stage, the rest the *detail* stage
(the released code switches after step ``switch_step``, i.e. at ``s <= switch_step``; we take the
issue's "first 40 %"). Steps map to timesteps as the model's own pipeline runs its scheduler (config
saved beside the model; :func:`export.families.reference_timesteps`): DDIM "leading"
``t(s) = (steps - 1 - s) * (T // steps) + steps_offset``, DPM-Solver "linspace", flow matching's
``sigma(s) * T`` with SD3's fixed shift or Flux's shift ``mu`` from the plan's token count, ...; DDIM's
when no scheduler is saved. Bucket boundaries lie just above a step's timestep, so a sampler with a
different step count still switches stage at the same noise level; flow matching's first step,
t = T = 1000.0, runs in the noisiest bucket (as the runtime maps it).
Each stage is cut into ``buckets_per_stage`` runs of consecutive steps; a bucket's ratio is the mean
of the cosine schedule ``rho(s) = (ratio - dev) + 2 dev cos(pi/2 s / (steps - 1))`` over its steps
(the released code evaluates rho per step; static graphs need one ratio per bucket).

Per bucket: structure buckets merge the top-k most uniform 2x2 windows around attention and MLP,
detail buckets merge the MLP only (bipartite, dst on the stalest token of each window); see
:mod:`passes.sdtm`. With ``protect_every`` > 0 each bucket also has a ``full`` variant that the
runtime runs every ``protect_every``-th step to refresh the per-layer cache blended into merged
positions on the other steps.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
from typing import ClassVar

import numpy as np
import torch

from export.buckets import DEFAULT_BUCKETS, BucketSpec
from export.measure import feed_of, max_abs
from export.methods import MAIN, BucketGraphs, BuildContext, Method
from export.onnx_export import eager_forward
from passes.errors import DitmergeError
from passes.onnxutil import get_model_meta
from passes.sdtm import (
    COUNTER_INPUT,
    COUNTER_OUTPUT,
    LOCATIONS,
    MERGES,
    PromptWeightPass,
    SdtmConfig,
    SdtmPass,
    bucket_values,
    cache_input,
    meta_counts,
    partition_from_counter,
)
from passes.counts import count_feed
from passes.sdtm.twin import SdtmTwin
from passes.partition import PARTITION_INPUT, PARTITION_INV_INPUT
from passes.trt_limits import TOPK_MAX_K
from passes.sdtm.variants import FULL  # one definition for build, run time and graph

logger = logging.getLogger(__name__)

STAGES = ("structure", "detail")


def rho(s: int, steps: int, ratio: float, dev: float) -> float:
    """The released code's cosine compression-ratio schedule: ratio + dev at step 0, ratio - dev at the last."""
    progress = s / (steps - 1) if steps > 1 else 0.0
    return (ratio - dev) + 2.0 * dev * math.cos(math.pi / 2 * progress)


def step_timestep(s: int, steps: int, num_train_timesteps: int, steps_offset: int = 0) -> int:
    """DDIM "leading" spacing: the timestep of step ``s`` of ``steps``."""
    return (steps - 1 - s) * (num_train_timesteps // steps) + steps_offset


@dataclasses.dataclass(frozen=True)
class StageBucket:
    stage: str
    first: int  # reference-schedule steps the bucket covers, inclusive
    last: int
    spec: BucketSpec


def stage_buckets(steps: int, switch_step: int, ratio: float, dev: float, per_stage: int,
                  num_train_timesteps: int, steps_offset: int = 0,
                  timesteps: list[float] | None = None) -> list[StageBucket]:
    """The buckets of the SDTM schedule, noisiest first (see the module docstring).

    ``timesteps``: the pipeline scheduler's timesteps for ``steps`` steps (:func:`reference_timesteps`);
    None: DDIM "leading" spacing with ``steps_offset``.
    """
    if timesteps is None:
        timesteps = [step_timestep(s, steps, num_train_timesteps, steps_offset) for s in range(steps)]
    groups = []
    for stage, lo, hi in (("structure", 0, min(switch_step, steps)), ("detail", min(switch_step, steps), steps)):
        count = hi - lo
        if count <= 0:
            continue
        parts = min(per_stage, count)
        edges = [lo + (count * i) // parts for i in range(parts + 1)]
        groups += [(stage, a, b - 1) for a, b in itertools.pairwise(edges)]
    out = []
    t_max = num_train_timesteps - 1
    for i, (stage, first, last) in enumerate(groups):
        t_hi = t_max if i == 0 else out[-1].spec.t_lo - 1
        t_lo = 0 if i == len(groups) - 1 else int(math.floor(timesteps[groups[i + 1][1]])) + 1
        if timesteps[last] < t_lo:  # float schedules: two steps within one integer timestep
            raise DitmergeError(f"sdtm steps {last} and {last + 1} of {steps} (timesteps {timesteps[last]:.3f}, "
                                f"{timesteps[last + 1]:.3f}) fall in one integer timestep, so no bucket boundary "
                                "separates them; choose fewer steps or move the boundary (buckets_per_stage, "
                                "switch_step)")
        r = float(np.mean([rho(s, steps, ratio, dev) for s in range(first, last + 1)]))
        out.append(StageBucket(stage, first, last, BucketSpec(t_lo, t_hi, round(r, 4))))
    return out


class Sdtm(Method):
    name = "sdtm"
    # a bucket's merged and full variants are branches of one graph (passes/branch.py): with k / r as count
    # inputs, every bucket of a stage shares it, so a plan holds one graph per stage
    one_graph = True
    defaults: ClassVar[dict[str, object]] = {
        "steps": 50,  # the reference schedule the stages and ratios are defined over
        "switch_step": 20,  # first step of the detail stage
        "ratio": 0.3,
        "dev": 0.2,
        "buckets_per_stage": 2,
        "a_s": 0.05,  # weight of the staleness term in window scores
        "protect_every": 3,  # every n-th step runs unmerged and refreshes the cache; 0: off
        "blend": 0.1,  # weight of the computed value at merged positions (the released code's mcw)
        "structure_merge": "window",  # ablation: "bipartite" merges the structure stage like the detail stage
        "structure_locations": ("attn", "joint", "mlp"),
        "detail_locations": ("mlp",),  # ablation: ("attn", "joint", "mlp") also merges attention
        # prompt reweighting (our reading of the paper, off at 1.0): weight on the attention image tokens
        # pay to prompt tokens in cross-attention, per stage
        "prompt_weight_structure": 1.0,
        "prompt_weight_detail": 1.0,
    }

    def __init__(self, options: dict[str, object] | None = None) -> None:
        super().__init__(options)
        self._stages: dict[tuple[int, int], str] = {}
        self._timesteps: list[float] | None = None  # the pipeline scheduler's, for the reference step count

    def params(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.options.items()}

    def schedule(self, num_train_timesteps: int, model: str = "", family=None,
                 grid: tuple[int, int] | None = None) -> list[StageBucket]:
        o = self.options
        if o["steps"] < 2 or not 0 <= o["switch_step"] <= o["steps"] or o["buckets_per_stage"] < 1:
            raise DitmergeError(f"sdtm needs steps >= 2, 0 <= switch_step <= steps and buckets_per_stage >= 1; got "
                                f"steps={o['steps']}, switch_step={o['switch_step']}, "
                                f"buckets_per_stage={o['buckets_per_stage']}")
        if o["steps"] > num_train_timesteps:
            raise DitmergeError(f"sdtm steps={o['steps']} exceeds the {num_train_timesteps} training timesteps")
        tokens = grid[0] * grid[1] if grid else None
        self._timesteps = _reference(model, o["steps"], num_train_timesteps, family, tokens)
        return stage_buckets(o["steps"], o["switch_step"], o["ratio"], o["dev"], o["buckets_per_stage"],
                             num_train_timesteps, timesteps=self._timesteps)

    def bucket_specs(self, buckets: str, num_train_timesteps: int, model: str, family=None,
                     grid: tuple[int, int] | None = None) -> list[BucketSpec]:
        if buckets != DEFAULT_BUCKETS:
            raise DitmergeError("sdtm derives its buckets from its options (steps, switch_step, ratio, dev, "
                                "buckets_per_stage); drop --buckets")
        sched = self.schedule(num_train_timesteps, model, family, grid)
        self._stages = {(b.spec.t_lo, b.spec.t_hi): b.stage for b in sched}
        for b in sched:
            logger.info("sdtm: %s bucket, steps %d-%d of %d (timesteps %.1f..%.1f), bucket %d..%d, ratio %.3f",
                        b.stage, b.first, b.last, self.options["steps"], self._timesteps[b.first],
                        self._timesteps[b.last], b.spec.t_hi, b.spec.t_lo, b.spec.ratio)
        return [b.spec for b in sched]

    def stage(self, spec: BucketSpec, num_train_timesteps: int) -> str:
        """The stage of a bucket: known from :meth:`bucket_specs`, else by where it starts."""
        if (spec.t_lo, spec.t_hi) in self._stages:
            return self._stages[(spec.t_lo, spec.t_hi)]
        o = self.options
        if o["switch_step"] >= o["steps"]:
            return "structure"
        if o["switch_step"] == 0:
            return "detail"
        ts = self._timesteps or [step_timestep(s, o["steps"], num_train_timesteps) for s in range(o["steps"])]
        boundary = int(math.floor(ts[o["switch_step"]])) + 1
        return "structure" if spec.t_lo >= boundary else "detail"

    def config(self, stage: str, ratio: float, variant: str = "merged") -> SdtmConfig:
        o = self.options
        merge = o["structure_merge"] if stage == "structure" else "bipartite"
        locations = o["structure_locations"] if stage == "structure" else o["detail_locations"]
        return SdtmConfig(variant=variant, merge=merge, ratio=ratio, locations=tuple(locations), a_s=o["a_s"],
                          blend=o["blend"] if o["protect_every"] > 0 else None)

    def validate(self, specs: list[BucketSpec], grid: tuple[int, int]) -> None:
        o = self.options
        if o["structure_merge"] not in MERGES:
            raise DitmergeError(f"structure_merge={o['structure_merge']!r}; choose from {', '.join(MERGES)}")
        for key in ("structure_locations", "detail_locations"):
            bad = [v for v in o[key] if v not in LOCATIONS]
            if bad or not o[key]:
                raise DitmergeError(f"{key}: unknown locations {bad or '(none)'}; choose from {', '.join(LOCATIONS)}")
        if o["protect_every"] < 0:
            raise DitmergeError(f"protect_every={o['protect_every']} must be >= 0 (0: no protected steps)")
        if grid[0] < 2 or grid[1] < 2:
            raise DitmergeError(f"sdtm needs a grid of at least 2x2 tokens, got {grid[0]}x{grid[1]}")
        windows = (grid[0] // 2) * (grid[1] // 2)
        if o["structure_merge"] == "window" and windows > TOPK_MAX_K:
            # the window ranking is one TopK over all windows; banding (as ToMe's) is not implemented for it
            raise DitmergeError(f"a {grid[0]}x{grid[1]} grid has {windows} 2x2 windows, more than TensorRT's TopK "
                                f"limit of {TOPK_MAX_K}; use -o structure_merge=bipartite for grids this large")
        for spec in specs:
            SdtmConfig(ratio=spec.ratio, blend=o["blend"]).validate()

    def stamp(self, spec: BucketSpec, index: int) -> dict:
        return {"method": self.name, "index": index, "spec": dataclasses.asdict(spec), "options": self.params(),
                "stages": sorted(self._stages.items())}

    def build_bucket(self, ctx: BuildContext, spec: BucketSpec, index: int) -> BucketGraphs:
        stage = self.stage(spec, ctx.num_train_timesteps)
        cfg = self.config(stage, spec.ratio)
        res = SdtmPass(cfg)(ctx.base)
        graphs: dict = {MAIN: res.model if res.modified else None}
        meta: dict = {"stage": stage, "removed": 0, "protect_every": self.options["protect_every"]}
        counts: dict[str, int] = {}
        if res.modified:
            # the graph is the same for every bucket of the stage; the bucket's k or r is a count input
            values = bucket_values(cfg, ctx.grid)
            counts = values.pop("counts")
            meta.update(json.loads(get_model_meta(res.model)["sdtm"]), **values)
        if self.options["protect_every"] > 0:
            full = SdtmPass(self.config(stage, spec.ratio, FULL))(ctx.base).model
            graphs[FULL] = full
            full_meta = json.loads(get_model_meta(full)["sdtm"])
            meta["cache_bytes_per_sample"] = full_meta["cache_bytes_per_sample"]
            meta.setdefault("cache_sites", full_meta["cache_sites"])
            meta.setdefault("widths", full_meta["widths"])
        meta["stage"] = stage
        weight = self.options[f"prompt_weight_{stage}"]
        if weight != 1.0:
            for variant in list(graphs):
                res = PromptWeightPass(weight)(graphs[variant] or ctx.base)
                graphs[variant] = res.model
            meta["prompt"] = json.loads(get_model_meta(graphs[MAIN])["sdtm_prompt"])
        removed = meta["removed"]
        return BucketGraphs(graphs, meta, removed, ctx.tokens - removed, counts)

    def extra_feed(self, ctx: BuildContext, meta: dict, variant: str, batch: int,
                   seed: int | None = 0) -> dict[str, np.ndarray]:
        if variant == FULL or not meta.get("removed"):
            return {}
        return sdtm_extra_feed(meta, batch, np.random.default_rng(seed))

    def fidelity(self, ctx: BuildContext, meta: dict, variant: str, run, inputs: dict[str, torch.Tensor]) -> float:
        if variant == FULL or not meta.get("removed"):
            # the full variant, or a bucket that merges nothing: the plain forward (+ cache outputs)
            plain = {"variant": FULL, "cache_sites": meta["cache_sites"] if variant == FULL else []}
            return sdtm_fidelity(ctx.torch_model, run, inputs, plain, {}, meta.get("prompt"))
        batch = next(iter(inputs.values())).shape[0]
        return sdtm_fidelity(ctx.torch_model, run, inputs, meta, sdtm_extra_feed(meta, batch, np.random.default_rng(0)),
                             meta.get("prompt"))


def sdtm_extra_feed(meta: dict, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Counters, partition and caches for a merged graph: random, for measuring; and its count inputs."""
    grid = tuple(meta["grid"])
    n = grid[0] * grid[1]
    counter = rng.integers(0, 6, (batch, n)).astype(np.float32)
    feed = {COUNTER_INPUT: counter, **count_feed(meta_counts(meta))}
    if meta["merge"] == "bipartite":
        feed[PARTITION_INPUT], feed[PARTITION_INV_INPUT] = partition_from_counter(grid, counter, rng, meta["bands"])
    for path in meta.get("cache_inputs", {}):
        feed[cache_input(path)] = rng.standard_normal((batch, n, meta["widths"][path])).astype(np.float32)
    return feed


def sdtm_fidelity(model: torch.nn.Module, run, inputs: dict[str, torch.Tensor], meta: dict,
                  extra: dict[str, np.ndarray], prompt: dict | None = None) -> float:
    """Max abs error of a graph's outputs (sample, counters, caches) against the eager twin, same inputs."""
    out = run({**feed_of(inputs), **extra})
    twin = SdtmTwin(model, meta, prompt)
    part = (extra[PARTITION_INPUT], extra[PARTITION_INV_INPUT]) if PARTITION_INPUT in extra else None
    twin.set_inputs(counter=extra.get(COUNTER_INPUT), partition=part,
                    caches={p: extra[cache_input(p)] for p in meta.get("cache_inputs", {})})
    with twin.installed():
        ref = eager_forward(model, inputs).numpy()
    err = max_abs(out["sample"], ref)
    for name, value in twin.outputs.items():
        err = max(err, max_abs(out[name], value.numpy()))
    if meta.get("variant") != FULL and COUNTER_OUTPUT not in twin.outputs:
        raise RuntimeError("the SDTM twin produced no counters")
    return err


def _reference(model: str, steps: int, num_train_timesteps: int, family=None,
               image_tokens: int | None = None) -> list[float]:
    """The timesteps the model's own pipeline sends with its scheduler (saved beside it) for ``steps`` steps
    at ``image_tokens`` tokens; DDIM's without one."""
    from export.families import reference_timesteps
    from export.load import scheduler_config

    try:
        cfg = scheduler_config(model) if model else None
    except (OSError, ValueError):  # an unreadable folder: diffusers' default
        cfg = None
    return reference_timesteps(cfg, steps, num_train_timesteps, family, image_tokens)


METHOD = Sdtm
__all__ = ["METHOD", "Sdtm", "rho", "stage_buckets", "step_timestep"]
