"""CA-ToMe at run time: match at the checkpoint steps, merge with the cached matching in between.

The cache (each block's index tensors, as the match variant returned them) lives in the generation's
state, so it starts empty for every generation. A step runs the ``match`` variant when

- it is the first step to reach a checkpoint of the schedule,
- the cache is empty, was taken in another bucket (whose r differs, so its indices do not fit), or at
  another batch size, or
- the plan was built with ``cache=False`` (CA-ToMe without the cache: ToMe with a calibrated r);

every other step runs ``main`` (the apply variant) fed from the cache.

The schedule is given as steps of a ``schedule_steps``-step run (the paper's: 50). The build turns them
into the timesteps the model's own scheduler gives those steps (``checkpoint_timesteps``): a call matches
when its timestep reaches the next one. For 50 steps of that scheduler this is exactly the listed steps;
for other step counts, the same noise levels. Plans without them map by progress through the
trajectory, p = (T - 1 - t) / T, against c / schedule_steps.
"""

from __future__ import annotations

import bisect

import numpy as np

from passes.catome import as_cache_feed
from passes.partition import PARTITION_INPUT, PARTITION_INV_INPUT, draw_partition
from passes.catome.variants import MATCH, PAPER_SCHEDULE, PAPER_SCHEDULE_STEPS
from runtime.policies import MAIN, GenState, StepPolicy

# a call reaches a checkpoint timestep within this (training scale): Flux sends t / 1000 in float32, and
# t back from it is up to ~3e-5 off; distinct steps lie at least ~1 apart
CHECKPOINT_TOL = 1e-3


class CaToMePolicy(StepPolicy):
    rows_independent = True  # the cached matching is per row ([B, K, Na])

    def __init__(self, plan, deterministic: bool = False) -> None:
        super().__init__(plan, deterministic)
        self.stride = tuple(self.params.get("stride", (2, 2)))
        self.cache = bool(self.params.get("cache", True))
        self.schedule_steps = int(self.params.get("schedule_steps", PAPER_SCHEDULE_STEPS))
        self.checkpoints = sorted(int(s) / self.schedule_steps for s in self.params.get("schedule", PAPER_SCHEDULE))
        self.num_train_timesteps = int(plan.record.model.num_train_timesteps)
        # the checkpoints as timesteps of the model's own scheduler (plans since issue 17); older plans map by progress
        self.checkpoint_timesteps = sorted((float(t) for t in self.params.get("checkpoint_timesteps", ())), reverse=True)

    def progress(self, state: GenState) -> float:
        """How far through the trajectory this call is, in [0, 1)."""
        if state.t is None:
            return state.steps / self.schedule_steps
        return (self.num_train_timesteps - 1 - state.t) / self.num_train_timesteps

    def select(self, state: GenState, bucket, batch: int) -> tuple[str, dict[str, np.ndarray]]:
        log = state.data.setdefault("log", [])  # (call, bucket, variant): which graphs ran, for reports and tests
        if not bucket.meta.get("r") or MATCH not in bucket.graphs:
            log.append((state.steps, bucket.index, MAIN))
            return MAIN, {}
        if self.checkpoint_timesteps and state.t is not None:
            reached = sum(1 for c in self.checkpoint_timesteps if state.t <= c + CHECKPOINT_TOL)
        else:
            reached = bisect.bisect_right(self.checkpoints, self.progress(state) + 1e-9)
        due = reached > state.data.get("reached", 0)
        state.data["reached"] = max(reached, state.data.get("reached", 0))
        cached = state.data.get("cache")
        if (self.cache and not due and cached is not None and cached["bucket"] == bucket.index
                and cached["batch"] == batch):
            log.append((state.steps, bucket.index, MAIN))
            return MAIN, cached["indices"]
        bands = int(bucket.meta.get("bands", 1))
        part, inv = draw_partition(self.grid, self.stride, None if self.deterministic else state.rng, bands)
        state.data["batch"] = batch
        log.append((state.steps, bucket.index, MATCH))
        return MATCH, {PARTITION_INPUT: part, PARTITION_INV_INPUT: inv}

    def update(self, state: GenState, bucket, variant: str, outputs: dict[str, np.ndarray]) -> None:
        if variant != MATCH:
            return
        # torch tensors (a device runner's outputs) stay where they are: the cache never leaves the GPU
        indices = {k: v if hasattr(v, "device") else np.ascontiguousarray(v)
                   for k, v in as_cache_feed(outputs).items()}
        state.data["cache"] = {"bucket": bucket.index, "batch": state.data["batch"], "indices": indices}


POLICY = CaToMePolicy
