"""SDTM at run time: protected full steps, the per-layer cache, and the staleness counters.

Per generation the policy keeps ``counter [B, N]`` (merge calls since each token was last left
unmerged; zeros at the start) and the cached sublayer outputs of the last protected step. Every
``protect_every``-th step (step index ``s % protect_every == 0``, as the released code) runs the
bucket's ``full`` graph, which refreshes the cache; the other steps run the merged graph with the
counters and the cache as inputs and take the advanced counters from its output. Detail buckets also
get ToMe's partition, with each window's dst on its stalest token: drawn with numpy from a host counter
(onnxruntime), and on the counter's device from a device counter (TensorRT), so the counter never
crosses to the host; only the tie-breaking noise goes up, as ToMe's partition does.
"""

from __future__ import annotations

import numpy as np

from passes.sdtm import (
    CACHE_OUTPUT,
    COUNTER_INPUT,
    COUNTER_OUTPUT,
    cache_input,
    partition_from_counter,
    partition_from_counter_torch,
    tie_noise,
)
from passes.partition import PARTITION_INPUT, PARTITION_INV_INPUT
from passes.sdtm.variants import FULL
from runtime.policies import MAIN, GenState, StepPolicy


class SdtmPolicy(StepPolicy):
    def __init__(self, plan, deterministic: bool = False) -> None:
        super().__init__(plan, deterministic)
        self.protect_every = int(self.params.get("protect_every", 0))
        self.tokens = self.grid[0] * self.grid[1]

    def start(self, state: GenState) -> None:
        state.data.update(counter=None, cache={}, log=[])

    def select(self, state: GenState, bucket, batch: int) -> tuple[str, dict[str, np.ndarray]]:
        variant, feed = self._select(state, bucket, batch)
        # (call, bucket, variant): which graphs ran, for reports and tests
        state.data.setdefault("log", []).append((state.steps, bucket.index, variant))
        return variant, feed

    def _select(self, state: GenState, bucket, batch: int) -> tuple[str, dict[str, np.ndarray]]:
        meta = bucket.meta
        cache = state.data.setdefault("cache", {})
        needs = list(meta.get("cache_inputs", {}))
        missing = any(p not in cache or cache[p].shape[0] != batch for p in needs)
        if FULL in bucket.graphs and (missing or (self.protect_every and state.steps % self.protect_every == 0)):
            return FULL, {}
        if not meta.get("removed"):
            return MAIN, {}
        counter = state.data.get("counter")
        if counter is None or tuple(counter.shape) != (batch, self.tokens):
            counter = np.zeros((batch, self.tokens), np.float32)
        feed = {COUNTER_INPUT: counter}
        if meta.get("merge") == "bipartite":
            rng = None if self.deterministic else state.rng
            bands = int(meta.get("bands", 1))
            if isinstance(counter, np.ndarray):
                part = partition_from_counter(self.grid, counter, rng, bands)
            else:  # a device tensor (TensorRT): the partition is drawn where the counter is
                part = partition_from_counter_torch(self.grid, counter, None if rng is None else tie_noise(self.grid, rng),
                                                    bands)
            feed[PARTITION_INPUT], feed[PARTITION_INV_INPUT] = part
        for path in needs:
            feed[cache_input(path)] = cache[path]
        return MAIN, feed

    def update(self, state: GenState, bucket, variant: str, outputs: dict[str, np.ndarray]) -> None:
        if COUNTER_OUTPUT in outputs:
            state.data["counter"] = outputs[COUNTER_OUTPUT]
        cache = state.data.setdefault("cache", {})
        for name, value in outputs.items():
            if name.startswith(CACHE_OUTPUT):
                cache[name[len(CACHE_OUTPUT):]] = value


POLICY = SdtmPolicy
