"""Step caching at run time: which steps run the full graph and which reuse the cached span residual.

Per generation the state holds the residuals of the last full step (per stream, as the runner returned
them: numpy from onnxruntime, device tensors from a runner that keeps them on the GPU; the policy never
converts them), the span and batch they were taken at, and the steps since. A step runs ``main`` (full)
when

- there is no usable cache: none yet this generation, another span (buckets may cache different
  blocks), or another batch size;
- the step's timestep is above the plan's ``full_above`` (the noisiest steps lay the image out);
- ``interval`` steps of the current bucket have passed since the last full step (``interval`` 1: always);
- adaptive plans only: the front blocks' output of the last cached step moved more than the threshold
  (relative L1 against the last full step, the cached graph's ``cache_change``, worst row of the batch).

The adaptive decision lags one step: a static graph cannot branch after its front blocks, so the change
a cached step measures decides the next step (the alternative, a front graph plus two back graphs, costs
an extra engine launch and an I/O round trip of every tensor crossing the cut on every step).

Classifier-free guidance: the cond and uncond halves are rows of one batch; every row keeps its own
residual, and one variant runs for the whole batch. Full steps of merged buckets get a fresh ToMe
partition per step, as :mod:`runtime.policies.tome`.
"""

from __future__ import annotations

import numpy as np

from passes.cache import CACHE_OUTPUT, CHANGE_OUTPUT, FRONT_INPUT, FRONT_OUTPUT, cache_input
from passes.partition import PARTITION_INPUT, PARTITION_INV_INPUT, draw_partition
from passes.cache.variants import CACHED
from runtime.policies import MAIN, GenState, StepPolicy


class CachePolicy(StepPolicy):
    def __init__(self, plan, deterministic: bool = False) -> None:
        super().__init__(plan, deterministic)
        self.stride = tuple(self.params.get("stride", (2, 2)))
        # a fixed schedule decides by step and timestep alone, the same for every row, and each row keeps its
        # own residual: requests may share a loop. An adaptive bucket decides on the worst row's change.
        self.rows_independent = not any(float(b.meta.get("adaptive", 0.0)) > 0 for b in plan.buckets)

    def start(self, state: GenState) -> None:
        state.data.update(cache=None, since=0, change=None, log=[])

    def select(self, state: GenState, bucket, batch: int) -> tuple[str, dict]:
        meta = bucket.meta
        cache = state.data.get("cache")
        usable = (CACHED in bucket.graphs and cache is not None and cache["span"] == meta.get("span")
                  and cache["batch"] == batch)
        interval = int(meta.get("interval", 1))
        threshold = float(meta.get("adaptive", 0.0))
        change = state.data.get("change")
        above = float(meta.get("full_above", -1))
        warm = above >= 0 and state.t is not None and state.t > above  # negative: no warm-up
        full = not usable or warm or state.data.get("since", 0) >= interval or (
            threshold > 0 and change is not None and change > threshold)
        variant = MAIN if full else CACHED
        state.data.setdefault("log", []).append((state.steps, bucket.index, variant))
        feed: dict = {}
        if variant in meta.get("merged_variants", []):
            rng = None if self.deterministic else state.rng
            feed[PARTITION_INPUT], feed[PARTITION_INV_INPUT] = draw_partition(
                self.grid, tuple(meta.get("stride", self.stride)), rng, int(meta.get("bands", 1)))
        if variant == CACHED:
            for stream, value in cache["residuals"].items():
                feed[cache_input(stream)] = value
            if threshold > 0:
                feed[FRONT_INPUT] = cache["front"]
        state.data["batch"] = batch
        # steps since the last full step, this one included (update() is not called for a cached step
        # whose graph returns nothing but the sample)
        state.data["since"] = 1 if full else state.data.get("since", 0) + 1
        return variant, feed

    def update(self, state: GenState, bucket, variant: str, outputs: dict) -> None:
        if variant == MAIN:
            residuals = {k[len(CACHE_OUTPUT):]: v for k, v in outputs.items() if k.startswith(CACHE_OUTPUT)}
            state.data["cache"] = {"span": bucket.meta.get("span"), "batch": state.data["batch"],
                                   "residuals": residuals, "front": outputs.get(FRONT_OUTPUT)}
            state.data["change"] = None
            return
        if CHANGE_OUTPUT in outputs:
            state.data["change"] = float(np.max(_host(outputs[CHANGE_OUTPUT])))


def _host(x) -> np.ndarray:
    """A few per-row scalars to the host (the one read-back of the adaptive rule)."""
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


POLICY = CachePolicy
