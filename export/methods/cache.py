"""Step caching (DeepCache / Delta-DiT / DBCache family, docs/design.md, 'Step caching') as a plan method, composable with ToMe.

Each bucket has two graphs (:mod:`passes.cache`): ``main``, a *full* step that runs every block and also
outputs the residual of the cached span (the token streams after the span minus before it), and ``cached``,
which runs only the front blocks (before the span) and the back blocks (after it) and adds the residual
in between. The runtime (:mod:`runtime.policies.cache`) runs a full step every ``interval`` steps of the
bucket, or, with ``adaptive`` > 0, whenever the front blocks' output has moved more than that (relative
L1 against the last full step, computed by the cached graph) or ``interval`` steps have passed.

Composition with ToMe: a bucket's ratio (``--buckets``) is the ToMe ratio of its full steps, merged at
``locations``. ToMe merges and unmerges inside each sublayer, so the block boundaries, and the cached
residual, are always the unmerged ``[B, N, C]`` token streams: a residual from a merged full step feeds a
cached step of any bucket with the same span. ``merge_cached`` also merges the front and back blocks of
cached steps (off by default: on small models the matching costs more than it saves there).

Options:
    span: blocks cached, "START-END" inclusive (one for every bucket, or one per bucket, noisiest first);
        "auto" computes the first block only (first-block caching; DBCache's F1B0).
    interval: a full step every this many steps, one per bucket or one for all; 1 never caches.
    full_above: every step whose timestep (training scale) is above this runs full: the first, noisiest
        steps lay out the image and caching them costs the most (DBCache's warm-up steps); -1: none.
    adaptive: > 0 switches to the first-block-cache rule with this threshold (``interval`` caps the run of
        cached steps).
    locations, stride: ToMe's, for full steps of buckets with a ratio above 0.
    merge_cached: merge the front/back blocks of cached steps too.

One graph per span (``Method.one_graph``): the full and cached variants are branches of one graph behind an
``If`` on the variant count (docs/design.md, 'A bucket is a shape'). A skipped span is a branch, not a span of
zero tokens: the cached step drops the span's nodes outright.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import ClassVar

import numpy as np
import torch

from export.buckets import BucketSpec
from export.measure import feed_of, max_abs
from export.methods import MAIN, BucketGraphs, BuildContext, Method
from export.onnx_export import eager_forward
from passes.cache import (
    CHANGE_OUTPUT,
    FRONT_INPUT,
    FRONT_OUTPUT,
    CacheConfig,
    CachePass,
    block_paths,
    cache_input,
    cache_output,
    locate_span,
)
from passes.cache.twin import CacheTwin
from passes.errors import DitmergeError
from passes.onnxutil import get_model_meta, infer_shapes
from passes.partition import PARTITION_INPUT, PARTITION_INV_INPUT, draw_partition, plan_bands
from passes.tome import DEFAULT_LOCATIONS, ToMeConfig, ToMePass
from passes.tome.twin import ToMeTwin
from passes.cache.variants import CACHED  # one definition for build, run time and graph

logger = logging.getLogger(__name__)

DEFAULT_BUCKETS = "0"  # one bucket, no merging: full steps run the unmerged graph


def parse_span(text: str, blocks: int) -> tuple[int, int]:
    """"START-END" (inclusive block indices) or "auto" (all but the first and last) -> (start, end exclusive)."""
    if text == "auto":
        if blocks < 2:
            raise DitmergeError(f"span=auto caches all but the first block; the model has only {blocks}")
        return 1, blocks
    try:
        a, b = (int(v) for v in text.split("-"))
    except ValueError:
        raise DitmergeError(f"span {text!r}: expected START-END (inclusive block indices, e.g. 1-4) or auto") from None
    if not 0 <= a <= b < blocks:
        raise DitmergeError(f"span {text!r} is outside the model's blocks 0-{blocks - 1}")
    return a, b + 1


def per_bucket(values: tuple, count: int, what: str) -> list:
    """One value for every bucket, or one per bucket."""
    if len(values) == 1:
        return list(values) * count
    if len(values) != count:
        raise DitmergeError(f"{what}: give one value or one per bucket ({count}); got {len(values)}")
    return list(values)


class StepCache(Method):
    name = "cache"
    one_graph = True  # the variants are branches of one graph (passes/branch.py): the weights once
    default_buckets = DEFAULT_BUCKETS
    defaults: ClassVar[dict[str, object]] = {
        "span": ("auto",),
        "interval": (3,),
        "full_above": 900,
        "adaptive": 0.0,
        "locations": DEFAULT_LOCATIONS,
        "stride": (2, 2),
        "merge_cached": False,
    }

    def __init__(self, options: dict[str, object] | None = None) -> None:
        super().__init__(options)
        self._spans: list[tuple[int, int]] = []
        self._intervals: list[int] = []

    def params(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.options.items()}

    def tome_config(self, ratio: float) -> ToMeConfig:
        return ToMeConfig(ratio=ratio, locations=tuple(self.options["locations"]),
                          stride=tuple(int(s) for s in self.options["stride"]))

    def validate(self, specs: list[BucketSpec], grid: tuple[int, int]) -> None:
        o = self.options
        for spec in specs:
            self.tome_config(spec.ratio).validate(grid)
        self._intervals = [int(v) for v in per_bucket(tuple(o["interval"]), len(specs), "interval")]
        if any(v < 1 for v in self._intervals):
            raise DitmergeError(f"interval {list(o['interval'])}: every value must be >= 1 (1: never cache)")
        if o["adaptive"] < 0:
            raise DitmergeError(f"adaptive={o['adaptive']} must be >= 0 (0: the fixed interval schedule)")
        per_bucket(tuple(o["span"]), len(specs), "span")

    def prepare(self, ctx: BuildContext) -> None:
        blocks = len(block_paths(ctx.base))
        count = len(self._intervals)
        self._spans = [parse_span(s, blocks) for s in per_bucket(tuple(self.options["span"]), count, "span")]
        if self.options["adaptive"] > 0 and any(a < 1 for a, _ in self._spans):
            raise DitmergeError("the adaptive rule reads the front blocks' output: spans must start at block 1 or later")
        shaped = infer_shapes(ctx.base)
        self._located = {}  # (start, end) -> its Span, located once for every bucket and variant
        for a, b in set(self._spans):
            span = locate_span(shaped, ctx.tokens, a, b)
            if not span.ok:
                raise DitmergeError(f"cannot cache blocks {a}-{b - 1}: {span.reason}")
            self._located[(a, b)] = span

    def stamp(self, spec: BucketSpec, index: int) -> dict:
        return {"method": self.name, "index": index, "spec": dataclasses.asdict(spec), "options": self.params(),
                "span": list(self._spans[index]) if self._spans else None}

    def build_bucket(self, ctx: BuildContext, spec: BucketSpec, index: int) -> BucketGraphs:
        start, end = self._spans[index] if isinstance(index, int) else self._spans[0]
        adaptive = self.options["adaptive"] > 0
        merged = ToMePass(self.tome_config(spec.ratio), bucket=index)(ctx.base)
        tome = json.loads(get_model_meta(merged.model)["tome"]) if merged.modified else {}
        span = getattr(self, "_located", {}).get((start, end))
        full = CachePass(CacheConfig("full", start, end, adaptive), index, locate_on=ctx.base,
                         span=span)(merged.model).model
        cached_src = merged.model if self.options["merge_cached"] else ctx.base
        cached = CachePass(CacheConfig("cached", start, end, adaptive), index, locate_on=ctx.base,
                           span=span)(cached_src).model
        info = json.loads(get_model_meta(full)["cache"])
        merged_variants = ([MAIN] + ([CACHED] if self.options["merge_cached"] else [])) if tome else []
        interval = self._intervals[index] if isinstance(index, int) else self._intervals[0]
        meta = {"span": [start, end], "blocks": info["blocks"], "streams": info["streams"],
                "cache_bytes_per_sample": info["cache_bytes_per_sample"], "interval": interval,
                "full_above": int(self.options["full_above"]),
                "adaptive": float(self.options["adaptive"]), "merged_variants": merged_variants,
                "span_nodes_kept": json.loads(get_model_meta(cached)["cache"])["span_nodes_kept"],
                "r": tome.get("r", 0), "tome": tome, "stride": list(self.options["stride"]),
                "bands": tome.get("bands", plan_bands(ctx.grid, tuple(self.options["stride"]),
                                                      self.tome_config(0.0).max_src_per_band))}
        logger.info("cache: bucket %s, blocks %d-%d cached, a full step every %d%s, ToMe r=%d on full steps", index,
                    start, end - 1, interval, f" (adaptive, threshold {self.options['adaptive']:g})" if adaptive else "",
                    meta["r"])
        r = meta["r"]
        return BucketGraphs({MAIN: full, CACHED: cached}, meta, r, ctx.tokens - r)

    def extra_feed(self, ctx: BuildContext, meta: dict, variant: str, batch: int,
                   seed: int | None = 0) -> dict[str, np.ndarray]:
        return cache_extra_feed(meta, variant, batch, ctx.grid, np.random.default_rng(seed), ctx.text_len)

    def fidelity(self, ctx: BuildContext, meta: dict, variant: str, run, inputs: dict[str, torch.Tensor]) -> float:
        batch = next(iter(inputs.values())).shape[0]
        extra = cache_extra_feed(meta, variant, batch, ctx.grid, np.random.default_rng(0), ctx.text_len)
        return cache_fidelity(ctx.torch_model, run, inputs, meta, variant, extra)


def cache_extra_feed(meta: dict, variant: str, batch: int, grid: tuple[int, int],
                     rng: np.random.Generator, text_len: int = 8) -> dict[str, np.ndarray]:
    """Inputs of a variant beyond the model's: partitions of merged variants, random caches of cached ones.

    A stream whose length is the graph's dynamic prompt axis (``"text"``) gets ``text_len`` tokens.
    """
    feed: dict[str, np.ndarray] = {}
    if variant in meta.get("merged_variants", []):
        feed[PARTITION_INPUT], feed[PARTITION_INV_INPUT] = draw_partition(grid, tuple(meta["stride"]), rng,
                                                                          int(meta["bands"]))
    if variant == CACHED:
        for stream, (tokens, width) in meta["streams"].items():
            length = text_len if isinstance(tokens, str) else tokens
            feed[cache_input(stream)] = (0.5 * rng.standard_normal((batch, length, width))).astype(np.float32)
        if meta.get("adaptive"):
            tokens, width = meta["streams"]["image"]
            feed[FRONT_INPUT] = rng.standard_normal((batch, tokens, width)).astype(np.float32)
    return feed


def cache_fidelity(model: torch.nn.Module, run, inputs: dict[str, torch.Tensor], meta: dict, variant: str,
                   extra: dict[str, np.ndarray]) -> float:
    """Max abs error of a variant's outputs (sample, residuals, front, change) against the eager twin."""
    out = run({**feed_of(inputs), **extra})
    start, end = meta["span"]
    residuals = {s: torch.from_numpy(extra[cache_input(s)]) for s in meta["streams"] if cache_input(s) in extra}
    front = torch.from_numpy(extra[FRONT_INPUT]) if FRONT_INPUT in extra else None
    twin = CacheTwin(model, start, end, "full" if variant == MAIN else CACHED, residuals, front)
    tome = meta.get("tome") or {}
    with _tome_twin(model, tome, extra), twin.installed():
        ref = eager_forward(model, inputs).numpy()
    err = max_abs(out["sample"], ref)
    if variant == MAIN:
        for stream in meta["streams"]:
            err = max(err, max_abs(out[cache_output(stream)], twin.outputs[stream].numpy()))
        if meta.get("adaptive"):
            err = max(err, max_abs(out[FRONT_OUTPUT], twin.outputs["front"].numpy()))
    elif meta.get("adaptive"):
        err = max(err, max_abs(out[CHANGE_OUTPUT], twin.outputs["change"].numpy()))
    return err


def _tome_twin(model: torch.nn.Module, tome: dict, extra: dict[str, np.ndarray]):
    import contextlib

    if not tome or PARTITION_INPUT not in extra:
        return contextlib.nullcontext()
    twin = ToMeTwin.from_meta(model, tome)
    twin.set_partition(torch.from_numpy(extra[PARTITION_INPUT]), torch.from_numpy(extra[PARTITION_INV_INPUT]))
    return twin.installed()


METHOD = StepCache
__all__ = ["CACHED", "METHOD", "StepCache", "cache_extra_feed", "cache_fidelity", "parse_span"]
