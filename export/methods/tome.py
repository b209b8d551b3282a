"""ToMe (tomesd's bipartite soft matching) as a plan method: one merged graph for every bucket.

The graph takes r as the length of its count input (``ToMeConfig.dynamic``, docs/design.md "a bucket is
a shape"), so every merged bucket references one file and the runtime opens one session (one TensorRT
engine with a profile per bucket). Unmerged buckets run the plain ``base.onnx``, or the merged graph at
r = 0 with ``unmerged_on_merged`` (one session for the whole plan, at the matching's cost at r = 0).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import torch

from export.buckets import BucketSpec
from export.measure import feed_of, max_abs, tome_fidelity
from export.methods import MAIN, BucketGraphs, BuildContext, Method
from export.onnx_export import eager_forward
from passes.onnxutil import get_model_meta
from passes.partition import draw_partition, num_dst, plan_bands
from passes.tome import (DEFAULT_LOCATIONS, DEFAULT_METRIC, PARTITION_INPUT, PARTITION_INV_INPUT, ToMeConfig, ToMePass,
                         count_values, merged_count, strip_bucket_meta)


class ToMe(Method):
    name = "tome"
    # metric: what the matching compares, "sublayer" (the adaLN-modulated sublayer input) or "block" (the
    # block's input, as tomesd); benchmarks/deviations.py measures both
    # unmerged_on_merged: unmerged buckets run the merged graph at r = 0 instead of base.onnx (one graph and
    # one session per plan; costs the matching at r = 0, see the README's memory table)
    defaults = {"locations": DEFAULT_LOCATIONS, "stride": (2, 2), "metric": DEFAULT_METRIC,
                "unmerged_on_merged": False}

    def config(self, ratio: float) -> ToMeConfig:
        return ToMeConfig(ratio=ratio, locations=tuple(self.options["locations"]),
                          stride=tuple(int(s) for s in self.options["stride"]), metric=str(self.options["metric"]),
                          dynamic=True)

    def params(self) -> dict:
        return {"locations": list(self.options["locations"]), "stride": list(self.options["stride"]),
                "metric": self.options["metric"], "unmerged_on_merged": bool(self.options["unmerged_on_merged"])}

    def validate(self, specs: list[BucketSpec], grid: tuple[int, int]) -> None:
        for spec in specs:
            self.config(spec.ratio).validate(grid)

    def bands(self, grid: tuple[int, int]) -> int:
        cfg = self.config(0.0)
        return plan_bands(grid, cfg.stride, cfg.max_src_per_band)

    def stamp(self, spec: BucketSpec, index: int) -> dict:
        return {**ToMePass(self.config(spec.ratio), bucket=index).stamp(), "ratio": spec.ratio, "bucket": index,
                "unmerged_on_merged": bool(self.options["unmerged_on_merged"])}

    def build_bucket(self, ctx: BuildContext, spec: BucketSpec, index: int) -> BucketGraphs:
        cfg = self.config(spec.ratio)
        n = ctx.tokens
        bands = self.bands(ctx.grid)
        r = merged_count(spec.ratio, n, n - num_dst(ctx.grid, cfg.stride)) // bands * bands
        if r == 0 and not self.options["unmerged_on_merged"]:
            return BucketGraphs({MAIN: None}, {"stride": list(self.options["stride"]), "bands": self.bands(ctx.grid)},
                                0, ctx.tokens)
        res = ToMePass(cfg, bucket=index)(ctx.base)
        meta = _tome_meta(res.model)
        graph = strip_bucket_meta(res.model)  # equal for every bucket: the plan stores it once
        return BucketGraphs({MAIN: graph}, meta, meta["r"], ctx.tokens - meta["r"], count_values(meta))

    def extra_feed(self, ctx: BuildContext, meta: dict, variant: str, batch: int,
                   seed: int | None = None) -> dict[str, np.ndarray]:
        if not meta.get("sites"):  # the unmerged base graph
            return {}
        rng = None if seed is None else np.random.default_rng(seed)
        part, inv = draw_partition(ctx.grid, tuple(meta["stride"]), rng, meta.get("bands", 1))
        return {PARTITION_INPUT: part, PARTITION_INV_INPUT: inv}

    def fidelity(self, ctx: BuildContext, meta: dict, variant: str, run, inputs: dict[str, torch.Tensor]) -> float:
        if not meta.get("r"):  # base.onnx, or the merged graph at r = 0: the eager model itself
            feed = {**feed_of(inputs), **self.extra_feed(ctx, meta, variant, 2, seed=0)}
            return max_abs(run(feed)["sample"], eager_forward(ctx.torch_model, inputs).numpy())
        return tome_fidelity(ctx.torch_model, SimpleNamespace(infer=run), inputs, meta, ctx.grid, seed=0)


def _tome_meta(model) -> dict:
    return json.loads(get_model_meta(model)["tome"])


METHOD = ToMe
__all__ = ["METHOD", "ToMe"]
