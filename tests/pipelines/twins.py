"""Eager twin transformers for whole-generation checks: the diffusers model with a method's eager twin
installed per call, driven by the plan's manifest alone.

Each twin stands in for ``pipe.transformer`` as the plan does. Per call it finds the bucket of the call's
timestep from the manifest's spans, decides which variant the method runs at this step from the plan's
parameters (re-implemented here from the method's description, not taken from ``runtime.policies``),
draws what the step needs from its own seeded stream (the stream ``runtime.load(seed=...)`` starts each
generation with; through the same pure draw functions, ``passes.partition.draw_partition`` and
``passes.sdtm.partition_from_counter``), runs the eager twin of that variant (``passes/*/twin.py``) and carries the step's state
(counters, caches, matchings, residuals) to the next call. ``log`` records (call, bucket, variant).

A twin serves one generation: make a new one per pipeline call.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

MAIN = "main"


class TwinTransformer(torch.nn.Module):
    """The common part: what pipelines touch on their transformer, the bucket lookup, the call loop."""

    def __init__(self, model: torch.nn.Module, manifest: dict, seed: int = 0) -> None:
        super().__init__()
        self.model, self.manifest = model, manifest
        self.grid = tuple(manifest["model"]["grid"])
        self.scale = float(manifest["model"].get("timestep_scale", 1.0))
        self.params = manifest["method"].get("params", {})
        self.rng = np.random.default_rng(seed)
        self.log: list[tuple[int, int, str]] = []
        self.step = 0

    @property
    def config(self):
        return self.model.config

    @property
    def dtype(self):
        return self.model.dtype

    @property
    def device(self):
        return self.model.device

    def cache_context(self, name: str):
        return self.model.cache_context(name)

    def bucket(self, t: float) -> dict:
        """The manifest bucket holding training-scale ``t`` ([t_lo, t_hi + 1)); t = T (flow) is the noisiest's."""
        buckets = sorted(self.manifest["buckets"], key=lambda b: b["t_hi"])
        for b in buckets:
            if b["t_lo"] <= t < b["t_hi"] + 1:
                return b
        assert t <= self.manifest["model"]["num_train_timesteps"], t
        return buckets[-1]

    def forward(self, hidden_states, timestep=None, **kwargs):
        t = float(torch.as_tensor(timestep).reshape(-1)[0]) / self.scale
        b = self.bucket(t)
        variant, ctx = self.step_twin(t, b, int(hidden_states.shape[0]))
        self.log.append((self.step, b["index"], variant))
        with ctx, torch.no_grad():
            out = self.model(hidden_states, timestep=timestep, **kwargs)
        self.after(b, variant)
        self.step += 1
        return out

    def step_twin(self, t: float, bucket: dict, batch: int) -> tuple[str, contextlib.AbstractContextManager]:
        """The variant of this step and its twin installed (as a context manager)."""
        raise NotImplementedError

    def after(self, bucket: dict, variant: str) -> None:
        """Carry what the step's twin recorded into the next step."""


class SdtmTwinTransformer(TwinTransformer):
    """SDTM: the step index ``s`` runs the bucket's ``full`` variant when ``s % protect_every == 0`` or the
    per-layer cache is not there yet (first step, batch changed); merged steps take the staleness counters
    (zeros at the start, advanced by each merged step) and the cache of the last full step; detail buckets
    put each window's dst on its stalest token (ties broken by the seeded stream)."""

    def __init__(self, model, manifest, seed: int = 0) -> None:
        super().__init__(model, manifest, seed)
        self.protect_every = int(self.params.get("protect_every", 0))
        self.counter: np.ndarray | None = None
        self.cache: dict[str, torch.Tensor] = {}
        self.twin = None

    def step_twin(self, t, bucket, batch):
        from passes.sdtm import partition_from_counter
        from passes.sdtm.twin import SdtmTwin

        meta = bucket["method_meta"]
        has_full = "full" in bucket.get("graphs", {})
        stale = any(p not in self.cache or self.cache[p].shape[0] != batch for p in meta.get("cache_inputs", {}))
        if has_full and (stale or (self.protect_every and self.step % self.protect_every == 0)):
            full = {"variant": "full", "cache_sites": meta["cache_sites"]}
            self.twin = SdtmTwin(self.model, full, meta.get("prompt"))
            return "full", self.twin.installed()
        if not meta.get("removed"):
            self.twin = None
            return MAIN, contextlib.nullcontext()
        if self.counter is None or self.counter.shape != (batch, self.grid[0] * self.grid[1]):
            self.counter = np.zeros((batch, self.grid[0] * self.grid[1]), np.float32)
        part = None
        if meta["merge"] == "bipartite":
            part = partition_from_counter(self.grid, self.counter, self.rng, int(meta.get("bands", 1)))
        self.twin = SdtmTwin(self.model, meta, meta.get("prompt"))
        self.twin.set_inputs(counter=self.counter, partition=part,
                             caches={p: self.cache[p] for p in meta.get("cache_inputs", {})})
        return MAIN, self.twin.installed()

    def after(self, bucket, variant):
        from passes.sdtm import CACHE_OUTPUT, COUNTER_OUTPUT

        if self.twin is None:
            return
        for name, value in self.twin.outputs.items():
            if name == COUNTER_OUTPUT:
                self.counter = value.numpy().astype(np.float32)
            elif name.startswith(CACHE_OUTPUT):
                self.cache[name[len(CACHE_OUTPUT):]] = value


class CaToMeTwinTransformer(TwinTransformer):
    """CA-ToMe: a merging bucket matches (a fresh seeded partition) at the first call whose timestep has
    reached a checkpoint not yet reached, or when its cached matching is missing or from another bucket or
    batch; every other call merges with the cached matching."""

    def __init__(self, model, manifest, seed: int = 0) -> None:
        super().__init__(model, manifest, seed)
        self.pending = sorted((float(c) for c in self.params["checkpoint_timesteps"]), reverse=True)
        self.use_cache = bool(self.params.get("cache", True))
        self.cached: tuple[int, int, dict] | None = None  # (bucket, batch, matching)
        self.twin, self.batch = None, 0

    def step_twin(self, t, bucket, batch):
        from passes.catome.twin import CaToMeTwin
        from passes.partition import draw_partition

        meta = bucket["method_meta"]
        due = False
        while self.pending and t <= self.pending[0] + 1e-3:  # checkpoints reached (Flux's t / 1000 in fp32: ~3e-5 off)
            self.pending.pop(0)
            due = True
        self.twin = None
        if not meta.get("r") or "match" not in bucket.get("graphs", {}):
            return MAIN, contextlib.nullcontext()
        args = (self.model, meta["sites"], meta["num_src"], meta.get("r_blocks") or meta["r"], meta.get("bands", 1))
        kw = {"metric": meta.get("metric", "sublayer"), "metric_blocks": meta.get("metric_blocks")}
        if self.use_cache and not due and self.cached is not None and self.cached[:2] == (bucket["index"], batch):
            return MAIN, CaToMeTwin(*args, cached=self.cached[2], **kw).installed()
        self.twin = CaToMeTwin(*args, **kw)
        part, inv = draw_partition(self.grid, tuple(meta["stride"]), self.rng, meta.get("bands", 1))
        self.twin.set_partition(torch.from_numpy(part), torch.from_numpy(inv))
        self.batch = batch
        return "match", self.twin.installed()

    def after(self, bucket, variant):
        if variant == "match":
            self.cached = (bucket["index"], self.batch, dict(self.twin.recorded))


class ATEDMTwinTransformer(TwinTransformer):
    """AT-EDM: stateless; each bucket prunes after its own block (DSAP) to its own kept count."""

    def step_twin(self, t, bucket, batch):
        from passes.atedm.graph import static_scores
        from passes.atedm.twin import ATEDMTwin

        meta = bucket["method_meta"]
        if "kept" not in meta:
            return MAIN, contextlib.nullcontext()
        static = torch.from_numpy(static_scores(self.grid)) if meta.get("importance") == "static" else None
        return MAIN, ATEDMTwin(self.model, meta["prune_block"], meta["last_block"], meta["kept"], meta["stride"],
                               meta["iterations"], static, meta.get("refill", "delta")).installed()


class CacheTwinTransformer(TwinTransformer):
    """Step caching: a call runs full when there is no residual of its bucket's span (first call, other span,
    other batch), when its timestep is above ``full_above``, or when ``interval`` calls have run since the
    last full one (this one included); otherwise it adds the last full step's residuals over the span.
    Full steps of merging buckets take a fresh seeded ToMe partition."""

    def __init__(self, model, manifest, seed: int = 0) -> None:
        super().__init__(model, manifest, seed)
        self.residuals: tuple[list, int, dict] | None = None  # (span, batch, stream -> residual)
        self.since = 0
        self.twin, self.batch = None, 0

    def step_twin(self, t, bucket, batch):
        from passes.cache.twin import CacheTwin
        from passes.partition import draw_partition
        from passes.tome.twin import ToMeTwin

        meta = bucket["method_meta"]
        start, end = meta["span"]
        have = self.residuals is not None and self.residuals[:2] == (meta["span"], batch)
        above = meta.get("full_above", -1)
        full = not have or (above >= 0 and t > above) or self.since >= int(meta.get("interval", 1))
        self.since = 1 if full else self.since + 1
        variant = MAIN if full else "cached"
        stack = contextlib.ExitStack()
        if variant in meta.get("merged_variants", []):
            tome = ToMeTwin.from_meta(self.model, meta["tome"])
            part, inv = draw_partition(self.grid, tuple(meta["stride"]), self.rng, int(meta.get("bands", 1)))
            tome.set_partition(torch.from_numpy(part), torch.from_numpy(inv))
            stack.enter_context(tome.installed())
        self.twin = CacheTwin(self.model, start, end, "full" if full else "cached",
                              None if full else self.residuals[2])
        stack.enter_context(self.twin.installed())
        self.batch = batch
        return variant, stack

    def after(self, bucket, variant):
        if variant == MAIN:
            streams = bucket["method_meta"]["streams"]
            self.residuals = (bucket["method_meta"]["span"], self.batch,
                              {s: self.twin.outputs[s] for s in streams})


TWINS = {"sdtm": SdtmTwinTransformer, "catome": CaToMeTwinTransformer, "atedm": ATEDMTwinTransformer,
         "cache": CacheTwinTransformer}
